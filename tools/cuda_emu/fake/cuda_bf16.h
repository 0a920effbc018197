// Storage-only stand-in for CUDA's __nv_bfloat16 (the kernels only pass it to WMMA).
#pragma once
struct __nv_bfloat16 { unsigned short x; };
