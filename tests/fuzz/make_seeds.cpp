// Writes the fuzzers' seed corpus (tests/fuzz/seeds.h), run at CI time: nothing binary is committed.
//   fuzz_seeds DIR   →   DIR/idx/*, DIR/checkpoint/*, DIR/int_model/*
#include <cstdio>

#include "core/error.h"
#include "tests/fuzz/seeds.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds DIR\n");
    return 2;
  }
  try {
    lowbit::fuzz::write_seeds(argv[1]);
  } catch (const lowbit::Error& e) {
    std::fprintf(stderr, "fuzz_seeds: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
