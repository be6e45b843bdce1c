# Fetch ONNX Runtime's C/C++ headers (no onnxruntime wheel ships them) into a folder.
#
# The headers come from Debian's libonnxruntime-dev package, pinned by version and SHA-256 and
# unpacked with CMake's own archive support (no apt, dpkg or root needed; any Linux with network
# access). Used two ways, one implementation:
#   include(): lsoftmax_fetch_ort_headers(<dest> <result-var>) sets <result-var> to the prefix
#              holding include/onnxruntime_cxx_api.h, or to "" with the reason in
#              LSOFTMAX_ORT_FETCH_ERROR;
#   script:    cmake -DDEST=<dest> -P cmake/fetch_ort_headers.cmake   (scripts/fetch_ort_headers.sh)
cmake_minimum_required(VERSION 3.18)  # file(ARCHIVE_EXTRACT)

set(LSOFTMAX_ORT_DEB "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
set(LSOFTMAX_ORT_DEB_SHA256 "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
# The Debian pool, then the snapshot archive's copy of the same file (by its SHA-1), in case the
# pool has moved on to a newer version.
set(LSOFTMAX_ORT_DEB_URLS
  "https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0%2bdfsg-1_amd64.deb"
  "https://snapshot.debian.org/file/24211608c53cf623c58ab2b2f9d4157ed06b3a76")

# Progress goes to stderr in script mode, whose stdout is the one line with the result.
if(CMAKE_SCRIPT_MODE_FILE)
  set(_lsoftmax_ort_log NOTICE)
else()
  set(_lsoftmax_ort_log STATUS)
endif()

function(lsoftmax_fetch_ort_headers dest result)
  set(LSOFTMAX_ORT_FETCH_ERROR "" PARENT_SCOPE)
  if(EXISTS "${dest}/include/onnxruntime_cxx_api.h")
    set(${result} "${dest}" PARENT_SCOPE)
    return()
  endif()
  set(work "${dest}.download")
  file(REMOVE_RECURSE "${work}")
  file(MAKE_DIRECTORY "${work}")
  set(errors "")
  foreach(url IN LISTS LSOFTMAX_ORT_DEB_URLS)
    message(${_lsoftmax_ort_log} "lsoftmax: fetching ONNX Runtime headers: ${url}")
    # The hash is checked by hand: with EXPECTED_HASH a failed download is a hard error and
    # the next URL would never be tried.
    file(DOWNLOAD "${url}" "${work}/${LSOFTMAX_ORT_DEB}" TLS_VERIFY ON TIMEOUT 120 STATUS status)
    list(GET status 0 code)
    if(code EQUAL 0)
      file(SHA256 "${work}/${LSOFTMAX_ORT_DEB}" got)
      if(got STREQUAL LSOFTMAX_ORT_DEB_SHA256)
        break()
      endif()
      string(APPEND errors " ${url}: SHA-256 ${got}, expected ${LSOFTMAX_ORT_DEB_SHA256};")
    else()
      list(GET status 1 why)
      string(APPEND errors " ${url}: ${why};")
    endif()
    file(REMOVE "${work}/${LSOFTMAX_ORT_DEB}")
  endforeach()
  if(NOT EXISTS "${work}/${LSOFTMAX_ORT_DEB}")
    file(REMOVE_RECURSE "${work}")
    set(${result} "" PARENT_SCOPE)
    set(LSOFTMAX_ORT_FETCH_ERROR "download failed:${errors}" PARENT_SCOPE)
    return()
  endif()
  # A .deb is an ar archive holding data.tar.*; the headers are usr/include/onnxruntime/*.
  file(ARCHIVE_EXTRACT INPUT "${work}/${LSOFTMAX_ORT_DEB}" DESTINATION "${work}/deb")
  file(GLOB data "${work}/deb/data.tar*")
  if(NOT data)
    file(REMOVE_RECURSE "${work}")
    set(${result} "" PARENT_SCOPE)
    set(LSOFTMAX_ORT_FETCH_ERROR "${LSOFTMAX_ORT_DEB} has no data.tar member" PARENT_SCOPE)
    return()
  endif()
  file(ARCHIVE_EXTRACT INPUT "${data}" DESTINATION "${work}/x" PATTERNS "usr/include/onnxruntime/*")
  file(REMOVE_RECURSE "${dest}")
  file(MAKE_DIRECTORY "${dest}")
  file(RENAME "${work}/x/usr/include/onnxruntime" "${dest}/include")
  file(REMOVE_RECURSE "${work}")
  if(NOT EXISTS "${dest}/include/onnxruntime_cxx_api.h")
    set(${result} "" PARENT_SCOPE)
    set(LSOFTMAX_ORT_FETCH_ERROR "${LSOFTMAX_ORT_DEB} has no onnxruntime_cxx_api.h" PARENT_SCOPE)
    return()
  endif()
  set(${result} "${dest}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT DEST)
    message(FATAL_ERROR "usage: cmake -DDEST=<folder> -P ${CMAKE_CURRENT_LIST_FILE}")
  endif()
  get_filename_component(DEST "${DEST}" ABSOLUTE)
  lsoftmax_fetch_ort_headers("${DEST}" root)
  if(NOT root)
    message(FATAL_ERROR "lsoftmax: could not fetch ONNX Runtime headers: ${LSOFTMAX_ORT_FETCH_ERROR}")
  endif()
  # The one line on stdout: the ONNXRUNTIME_ROOT to use.
  execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${root}")
endif()
