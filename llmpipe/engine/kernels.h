/* The engine's kernels' shared settings (products.c, rows.c). */
#ifndef LLMPIPE_ENGINE_KERNELS_H
#define LLMPIPE_ENGINE_KERNELS_H
#include "simd.h"

#define MAX_HEAD_DIM 512 /* the scores bound in attention.c allows head_dim <= 518 (kernels.py: MAX_HEAD_DIM) */

#endif
