// Host-side harness for firmware_examples/arduino_sensor/edgekit_frame.h.
//
// test_firmware_framing.py compiles this with the host C++ compiler and checks that the bytes
// the firmware code produces decode in Python, and that frames Python produces (with noise in
// between) parse in the firmware code. Modes (argv[1]):
//
//   encode  write a fixed script of frames to stdout
//   decode  read a byte stream on stdin, print one line per frame the FrameReader accepts
//   cobs    read u16-length-prefixed blobs on stdin, write each COBS-encoded + 0x00

#include <stdio.h>
#include <string.h>

#include <vector>

#include "edgekit_frame.h"

using namespace edgekit;

static void emit(const uint8_t* frame, size_t len) {
  std::vector<uint8_t> encoded(cobs_max_encoded(len) + 1);
  size_t n = cobs_encode(frame, len, encoded.data());
  encoded[n++] = 0;
  fwrite(encoded.data(), 1, n, stdout);
}

static int encode_mode() {
  uint8_t frame[512];
  fputc(0, stdout);
  emit(frame, build_hello(frame, 0, 3, 20, "harness"));
  const float a[3] = {0.5f, -1.25f, 3.0f};
  emit(frame, build_sensor_record(frame, 1, 1000, a, 3));
  const float zeros[3] = {0.0f, 0.0f, 0.0f};
  emit(frame, build_sensor_record(frame, 2, 0, zeros, 3));
  float many[70];
  for (int i = 0; i < 70; ++i) many[i] = 1.1f + (float)i;  // long zero-free run: 0xFF blocks
  emit(frame, build_sensor_record(frame, 65535, 4294967295u, many, 70));
  emit(frame, build_error(frame, 7, ERR_OVERRUN, 42, "sample overrun"));
  return 0;
}

static int decode_mode() {
  FrameReader<300> reader;
  int c;
  while ((c = getchar()) != EOF) {
    size_t len = reader.push((uint8_t)c);
    if (!len) continue;
    const uint8_t* frame = reader.frame();
    Result result;
    ErrorReport error;
    if (parse_result(frame, len, &result)) {
      printf("RESULT %u %u %d %.9g", result.seq, result.window_seq, result.class_index,
             (double)result.score);
      for (uint8_t i = 0; i < result.output_count; ++i) {
        printf(" %.9g", (double)get_f32(result.outputs + 4 * i));
      }
      printf("\n");
    } else if (parse_error(frame, len, &error)) {
      printf("ERROR %u %u %u\n", error.seq, error.code, error.ref_seq);
    } else {
      printf("OTHER %u %u\n", frame_type(frame), (unsigned)len);
    }
  }
  printf("BAD %u\n", reader.bad());
  return 0;
}

static int cobs_mode() {
  unsigned char head[2];
  while (fread(head, 1, 2, stdin) == 2) {
    size_t len = (size_t)head[0] | ((size_t)head[1] << 8);
    std::vector<uint8_t> blob(len + 1);
    if (fread(blob.data(), 1, len, stdin) != len) return 1;
    emit(blob.data(), len);
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (!strcmp(argv[1], "encode")) return encode_mode();
  if (!strcmp(argv[1], "decode")) return decode_mode();
  if (!strcmp(argv[1], "cobs")) return cobs_mode();
  return 2;
}
