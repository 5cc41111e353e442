// edgekit serial framing for microcontrollers: COBS frames, 0x00 delimiter, CRC-16/CCITT-FALSE.
//
// The byte layouts are specified in docs/serial-protocol.md of the edgekit repository; the
// host side is device_agent/serial/framing.py. This header has no Arduino dependency (only
// <stdint.h>, <stddef.h>, <string.h>), allocates nothing, and compiles as C++11, so the same
// code runs on an 8-bit AVR, a Cortex-M and in the host-side test that checks it against the
// Python implementation.
//
// Every multi-byte field is little-endian. Floats are IEEE-754 binary32, which is what
// `float` is on AVR, ARM and x86; they are copied bit for bit, never converted.

#ifndef EDGEKIT_FRAME_H
#define EDGEKIT_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace edgekit {

const uint8_t PROTOCOL_VERSION = 1;
const size_t HEADER_SIZE = 4;  // version, type, seq (uint16)
const size_t CRC_SIZE = 2;
const size_t MIN_FRAME = HEADER_SIZE + CRC_SIZE;
const size_t MAX_NAME_BYTES = 32;
const size_t MAX_TEXT_BYTES = 64;

enum MessageType : uint8_t {
  MSG_HELLO = 0x01,
  MSG_SENSOR_RECORD = 0x02,
  MSG_RESULT = 0x03,
  MSG_ERROR = 0x04,
};

enum ErrorCode : uint8_t {
  ERR_UNSPECIFIED = 0,
  ERR_BAD_FRAME = 1,
  ERR_BAD_RECORD = 2,
  ERR_PREDICT_FAILED = 3,
  ERR_SENSOR_FAULT = 4,
  ERR_OVERRUN = 5,
};

// Size of the COBS encoding of `len` bytes, at most (delimiter not included).
inline size_t cobs_max_encoded(size_t len) { return len + len / 254 + 1; }

// ------------------------------------------------------------------------------ CRC-16

// CRC-16/CCITT-FALSE, one byte at a time: poly 0x1021, MSB first, init 0xFFFF, no final xor.
// Bitwise on purpose: no 512-byte table in an Uno's 2 KiB of RAM, and at 50 Hz x 22 bytes the
// ~100 cycles per byte cost well under 1% of a 16 MHz AVR.
inline uint16_t crc16_update(uint16_t crc, uint8_t byte) {
  crc ^= (uint16_t)((uint16_t)byte << 8);
  for (uint8_t bit = 0; bit < 8; ++bit) {
    crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
  }
  return crc;
}

inline uint16_t crc16(const uint8_t* data, size_t len) {
  uint16_t crc = 0xFFFF;
  for (size_t i = 0; i < len; ++i) crc = crc16_update(crc, data[i]);
  return crc;
}

// --------------------------------------------------------------------------------- COBS

// Encode `len` bytes of `src` into `dst` (room for cobs_max_encoded(len) bytes); return the
// encoded length. The result contains no 0x00; the caller sends one 0x00 after it.
inline size_t cobs_encode(const uint8_t* src, size_t len, uint8_t* dst) {
  size_t code_at = 0;  // where the current block's code byte goes
  size_t out = 1;
  uint8_t code = 1;  // 1 + bytes in the current block
  for (size_t i = 0; i < len; ++i) {
    if (src[i] == 0) {
      dst[code_at] = code;
      code_at = out++;
      code = 1;
    } else {
      dst[out++] = src[i];
      if (++code == 0xFF) {  // a full block of 254 bytes implies no zero after it
        dst[code_at] = code;
        code_at = out++;
        code = 1;
      }
    }
  }
  dst[code_at] = code;
  return out;
}

// Decode one frame (without its delimiter) into `dst` (capacity `cap`); return the decoded
// length, or 0 if the input is not valid COBS or does not fit. `dst` may equal `src`: the
// write position never overtakes the read position, so decoding in place is safe.
inline size_t cobs_decode(const uint8_t* src, size_t len, uint8_t* dst, size_t cap) {
  size_t i = 0;
  size_t out = 0;
  while (i < len) {
    uint8_t code = src[i++];
    if (code == 0) return 0;
    for (uint8_t k = 1; k < code; ++k) {
      if (i >= len || src[i] == 0 || out >= cap) return 0;
      dst[out++] = src[i++];
    }
    if (code != 0xFF && i < len) {
      if (out >= cap) return 0;
      dst[out++] = 0;
    }
  }
  return out;
}

// ------------------------------------------------------------------- little-endian fields

inline void put_u16(uint8_t* p, uint16_t v) {
  p[0] = (uint8_t)(v & 0xFF);
  p[1] = (uint8_t)(v >> 8);
}

inline void put_u32(uint8_t* p, uint32_t v) {
  for (uint8_t i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

inline void put_f32(uint8_t* p, float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);  // bit copy: well defined, unlike a pointer cast
  put_u32(p, bits);
}

inline uint16_t get_u16(const uint8_t* p) { return (uint16_t)(p[0] | ((uint16_t)p[1] << 8)); }

inline int16_t get_i16(const uint8_t* p) { return (int16_t)get_u16(p); }

inline float get_f32(const uint8_t* p) {
  uint32_t bits = 0;
  for (uint8_t i = 0; i < 4; ++i) bits |= (uint32_t)p[i] << (8 * i);
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

// ------------------------------------------------------------------------ building frames
// Each builder writes header + payload + CRC into `frame` and returns the frame length; run
// the result through cobs_encode() and send it followed by one 0x00.

inline size_t finish_frame(uint8_t* frame, uint8_t type, uint16_t seq, size_t payload_len) {
  frame[0] = PROTOCOL_VERSION;
  frame[1] = type;
  put_u16(frame + 2, seq);
  size_t body = HEADER_SIZE + payload_len;
  put_u16(frame + body, crc16(frame, body));
  return body + CRC_SIZE;
}

// `frame` needs HEADER_SIZE + 4 + 4 * count + CRC_SIZE bytes.
inline size_t build_sensor_record(uint8_t* frame, uint16_t seq, uint32_t timestamp_ms,
                                  const float* values, uint8_t count) {
  uint8_t* p = frame + HEADER_SIZE;
  put_u32(p, timestamp_ms);
  for (uint8_t i = 0; i < count; ++i) put_f32(p + 4 + 4 * i, values[i]);
  return finish_frame(frame, MSG_SENSOR_RECORD, seq, 4 + 4 * (size_t)count);
}

inline size_t copy_text(uint8_t* dst, const char* text, size_t limit) {
  size_t n = text ? strlen(text) : 0;
  if (n > limit) n = limit;
  if (n) memcpy(dst, text, n);
  return n;
}

// `frame` needs HEADER_SIZE + 3 + MAX_NAME_BYTES + CRC_SIZE bytes at most.
inline size_t build_hello(uint8_t* frame, uint16_t seq, uint8_t channels,
                          uint16_t sample_period_ms, const char* name) {
  uint8_t* p = frame + HEADER_SIZE;
  p[0] = channels;
  put_u16(p + 1, sample_period_ms);
  size_t n = copy_text(p + 3, name, MAX_NAME_BYTES);
  return finish_frame(frame, MSG_HELLO, seq, 3 + n);
}

// `frame` needs HEADER_SIZE + 3 + strlen(text) (at most MAX_TEXT_BYTES) + CRC_SIZE bytes.
inline size_t build_error(uint8_t* frame, uint16_t seq, uint8_t code, uint16_t ref_seq,
                          const char* text) {
  uint8_t* p = frame + HEADER_SIZE;
  p[0] = code;
  put_u16(p + 1, ref_seq);
  size_t n = copy_text(p + 3, text, MAX_TEXT_BYTES);
  return finish_frame(frame, MSG_ERROR, seq, 3 + n);
}

// ------------------------------------------------------------------------- reading frames

struct Result {
  uint16_t seq;
  uint16_t window_seq;     // sequence number of the newest record in the window
  int16_t class_index;     // argmax of the model output
  float score;             // the output value at class_index
  uint8_t output_count;    // raw outputs that follow (0 unless the host sends them)
  const uint8_t* outputs;  // output_count little-endian float32, read with get_f32()
};

struct ErrorReport {
  uint16_t seq;
  uint8_t code;
  uint16_t ref_seq;
};

inline uint8_t frame_type(const uint8_t* frame) { return frame[1]; }
inline uint16_t frame_seq(const uint8_t* frame) { return get_u16(frame + 2); }

// Parse a checked frame (from FrameReader) of type MSG_RESULT; false if the size is wrong.
inline bool parse_result(const uint8_t* frame, size_t len, Result* out) {
  if (frame_type(frame) != MSG_RESULT || len < MIN_FRAME + 8) return false;
  size_t extra = len - MIN_FRAME - 8;
  if (extra % 4 != 0 || extra / 4 > 255) return false;
  const uint8_t* p = frame + HEADER_SIZE;
  out->seq = frame_seq(frame);
  out->window_seq = get_u16(p);
  out->class_index = get_i16(p + 2);
  out->score = get_f32(p + 4);
  out->output_count = (uint8_t)(extra / 4);
  out->outputs = p + 8;
  return true;
}

inline bool parse_error(const uint8_t* frame, size_t len, ErrorReport* out) {
  if (frame_type(frame) != MSG_ERROR || len < MIN_FRAME + 3) return false;
  out->seq = frame_seq(frame);
  out->code = frame[HEADER_SIZE];
  out->ref_seq = get_u16(frame + HEADER_SIZE + 1);
  return true;
}

// Incremental receiver: push() bytes as they arrive. When a delimiter completes a frame that
// decodes, fits, has a good CRC and this protocol version, push() returns its length and
// frame() holds it (valid until the next push). Anything else is counted in bad() and
// skipped; a run of more than N bytes without a delimiter is dropped as it overflows, so a
// noisy line can never overrun the buffer.
template <size_t N>
class FrameReader {
 public:
  FrameReader() : len_(0), discarding_(false), bad_(0) {}

  size_t push(uint8_t byte) {
    if (byte != 0) {
      if (discarding_) return 0;
      if (len_ == N) {
        discarding_ = true;
        len_ = 0;
        ++bad_;
        return 0;
      }
      buf_[len_++] = byte;
      return 0;
    }
    size_t encoded = len_;
    len_ = 0;
    if (discarding_) {
      discarding_ = false;
      return 0;
    }
    if (encoded == 0) return 0;  // a lone delimiter just flushes
    size_t n = cobs_decode(buf_, encoded, buf_, N);
    if (n < MIN_FRAME || get_u16(buf_ + n - CRC_SIZE) != crc16(buf_, n - CRC_SIZE) ||
        buf_[0] != PROTOCOL_VERSION) {
      ++bad_;
      return 0;
    }
    return n;
  }

  const uint8_t* frame() const { return buf_; }
  uint16_t bad() const { return bad_; }

 private:
  uint8_t buf_[N];
  size_t len_;
  bool discarding_;
  uint16_t bad_;
};

}  // namespace edgekit

#endif  // EDGEKIT_FRAME_H
