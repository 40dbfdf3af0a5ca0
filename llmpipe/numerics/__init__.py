"""What must give the same bits on every machine and several layers share: lookup tables built without the
platform's math library, and building the compiled kernels (ARCHITECTURE.md)."""
