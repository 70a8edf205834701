// The kernels compiled for one instruction set (flags in setup.py); picked at import by
// densenet_fast/backends.py from the running CPU.
#include "../extension.cpp"
