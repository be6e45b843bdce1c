#include "bindings.h"

namespace lsoftmax::python {

void bind_cuda(pybind11::module_& /*m*/) {}

}  // namespace lsoftmax::python
