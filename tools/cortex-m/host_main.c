/* host_main.c: runs an exported model (model.h) on the host, for every image of a raw file (IMAGE_BYTES bytes
   each, e.g. an IDX file without its header), and prints "image I: L0 ... class C" lines like `eval --logits`. */
#include <stdio.h>

#include "model.h"

static unsigned char arena[MODEL_ARENA_BYTES];

int main(int argc, char **argv) {
  static uint8_t image[MODEL_INPUT_BYTES];
  int8_t logits[MODEL_NUM_CLASSES];
  long i;
  int c;
  FILE *in;
  if (argc != 2 || !(in = fopen(argv[1], "rb"))) {
    fprintf(stderr, "usage: %s IMAGES.raw\n", argv[0]);
    return 2;
  }
  for (i = 0; fread(image, 1, sizeof image, in) == sizeof image; ++i) {
    const int predicted = model_run(image, logits, arena);
    printf("image %ld:", i);
    for (c = 0; c < MODEL_NUM_CLASSES; ++c) printf(" %d", logits[c]);
    printf(" class %d\n", predicted);
  }
  fclose(in);
  return 0;
}
