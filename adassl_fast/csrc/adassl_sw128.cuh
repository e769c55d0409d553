// Shared-memory layout of the wgmma tile path (AsyncMma in adassl_mma.cuh): 64-row tiles of 16-bit
// elements in 128-byte-swizzled atoms, and the matrix descriptors its two products read them through.
//
// Plain C++ with __host__ __device__ qualifiers (as adassl_math.cuh): tests/test_cuda_build.py compiles it
// for the host and checks, with a decoder written from the PTX ISA's canonical layouts, that every element
// each descriptor addresses is the tile element the product needs.
#pragma once

#include <cstdint>

#include "adassl_math.cuh"

namespace adassl {

constexpr int kSwRows = 64;                   // rows per tile (the streamed tile; the owned tile is the same)
constexpr uint32_t kSwAtomBytes = kSwRows * 128;  // one 64-column (128-byte) atom of a tile

// Element offset of (row r, column c): atom c / 64, row r at 128 bytes, and 16-byte chunk (c / 8) % 8
// stored at chunk ((c / 8) % 8) ^ (r % 8), the 128-byte swizzle the tensor cores undo on a 1024-byte-aligned
// tile (they XOR address bits 4-6 with bits 7-9).
ADASSL_HD int sw128_offset(int r, int c) {
  return (c >> 6) * (kSwRows * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// wgmma matrix descriptor (PTX "Matrix Descriptor Format"): start address, leading and stride byte
// offsets (each >> 4, 14 bits), swizzle mode 1 (128 bytes) in bits 62-63, base offset 0.
ADASSL_HD uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// B of S = U V^T, k-step kk (features 16 kk .. 16 kk + 15) of the tile at smem address base: K-major, the
// tile's rows are B's columns. Within an atom a k-step starts 32 bytes further (the hardware swizzles the
// address it forms); 8-row groups are 1024 bytes apart (stride offset); the leading offset is unused.
ADASSL_HD uint64_t s_operand_desc(uint32_t base, int kk) {
  return sw128_desc(base + static_cast<uint32_t>(kk >> 2) * kSwAtomBytes + static_cast<uint32_t>(kk & 3) * 32u, 16u,
                    1024u);
}

// B of G V, k-step kk (tile rows 16 kk .. 16 kk + 15) and 64 features from atom f: MN-major (features
// contiguous), 8-row groups 1024 bytes apart (stride offset), atoms kSwAtomBytes apart (leading offset).
ADASSL_HD uint64_t g_operand_desc(uint32_t base, int f, int kk) {
  return sw128_desc(base + static_cast<uint32_t>(f) * kSwAtomBytes + static_cast<uint32_t>(kk) * 2048u,
                    kSwAtomBytes, 1024u);
}

}  // namespace adassl
