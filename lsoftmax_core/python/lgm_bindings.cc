#include "bindings.h"

namespace lsoftmax::python {

void bind_lgm(pybind11::module_& /*m*/) {}

}  // namespace lsoftmax::python
