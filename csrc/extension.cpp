// The extension module densenet_fast._C_<build>: every CPU kernel in one translation unit,
// compiled once per instruction set (the one-line files in builds/, flags in setup.py).
// Importing it runs the kernels' TORCH_LIBRARY registrations; the module itself is empty.

#include <Python.h>

#include "batch_norm.cpp"
#include "bn_relu.cpp"
#include "bn_relu_conv1x1.cpp"
#include "bn_relu_max_pool.cpp"
#include "running_stats.cpp"
#include "stats_term.cpp"

#define DENSENET_FAST_CONCAT_(a, b) a##b
#define DENSENET_FAST_CONCAT(a, b) DENSENET_FAST_CONCAT_(a, b)
#define DENSENET_FAST_STRING_(a) #a
#define DENSENET_FAST_STRING(a) DENSENET_FAST_STRING_(a)

extern "C" PyObject* DENSENET_FAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                      DENSENET_FAST_STRING(TORCH_EXTENSION_NAME), nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
