// The doctest main shared by every test executable. Like every lowbit program, it first shortens
// OpenMP's spin-waiting (core/threads.h), so that the tests run as the programs do.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "core/threads.h"

int main(int argc, char** argv) {
  lowbit::shorten_openmp_waits(argv);
  return doctest::Context(argc, argv).run();
}
