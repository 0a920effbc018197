// Storage-only stand-in for CUDA's __half (the kernels only pass it to WMMA).
#pragma once
struct __half { unsigned short x; };
