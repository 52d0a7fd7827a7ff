/* main.c: runs an exported model (model.h, from `export --format c --prefix model`) on the test images in
   images.h and prints one line per image, "image I: L0 L1 ... class C", the format of `eval --logits`; then
   one line "stack: B bytes", the deepest the stack has been. */
#include <stdint.h>

#include "images.h"
#include "model.h"
#include "startup.h"

/* The images must have the model's input size. */
typedef char image_size_matches_model[IMAGE_BYTES == MODEL_INPUT_BYTES ? 1 : -1];

static uint8_t arena[MODEL_ARENA_BYTES]; /* the model's working memory (.bss, in RAM) */

/* Appends the decimal text of v at *p. */
static void put_int(char **p, int32_t v) {
  char digits[12];
  int n = 0;
  uint32_t u = v < 0 ? (uint32_t)0 - (uint32_t)v : (uint32_t)v;
  if (v < 0) *(*p)++ = '-';
  do {
    digits[n++] = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  while (n) *(*p)++ = digits[--n];
}

static void put_text(char **p, const char *s) {
  while (*s) *(*p)++ = *s++;
}

int main(void) {
  int8_t logits[MODEL_NUM_CLASSES];
  char line[32 + 5 * MODEL_NUM_CLASSES];
  int32_t i, c;
  for (i = 0; i < NUM_IMAGES; ++i) {
    char *p = line;
    const int predicted = model_run(images[i], logits, arena);
    put_text(&p, "image ");
    put_int(&p, FIRST_IMAGE + i);
    put_text(&p, ":");
    for (c = 0; c < MODEL_NUM_CLASSES; ++c) {
      put_text(&p, " ");
      put_int(&p, logits[c]);
    }
    put_text(&p, " class ");
    put_int(&p, predicted);
    put_text(&p, "\n");
    *p = '\0';
    semihost_write0(line);
  }
  {
    char *p = line;
    put_text(&p, "stack: ");
    put_int(&p, (int32_t)stack_bytes_used());
    put_text(&p, " bytes\n");
    *p = '\0';
    semihost_write0(line);
  }
  return 0;
}
