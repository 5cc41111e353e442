// arduino_sensor: stream analog sensor samples to the edgekit agent and show its answers.
//
// Every SAMPLE_PERIOD_MS the sketch reads CHANNELS analog pins (e.g. the X/Y/Z outputs of an
// ADXL335 accelerometer on A0..A2), converts them to volts and sends one SENSOR_RECORD frame.
// The agent (device_agent.serial.SerialBridge) windows the records, runs the model and sends a
// RESULT frame back for each window; the built-in LED is lit while the model's answer is
// ALERT_CLASS, and blinks fast when the agent reports that inference failed.
//
// Framing (see docs/serial-protocol.md): each frame is header + payload + CRC-16/CCITT-FALSE,
// COBS-encoded and followed by one 0x00. The implementation lives in edgekit_frame.h, next to
// this file; the Arduino IDE compiles both.
//
// Never print text on `Serial`: it is the data link, and text bytes would corrupt the frame
// they land in. Set EDGEKIT_DEBUG to 1 to print on `Serial1` instead, on boards that have a
// second UART (Leonardo, Micro, Mega, Nano 33 IoT/BLE; not the Uno).
//
// Written for the Arduino Uno / Nano (AVR, 5 V ADC reference) and Nano 33 IoT / BLE (3.3 V).
// edgekit_frame.h is compiled and checked byte for byte against the Python implementation by
// tests/device_agent/serial/test_firmware_framing.py; this file is built by the Arduino IDE.

#include "edgekit_frame.h"

// ----------------------------------------------------------------------- configuration

const uint8_t CHANNELS = 3;
const uint8_t SENSOR_PINS[CHANNELS] = {A0, A1, A2};
const uint16_t SAMPLE_PERIOD_MS = 20;  // 50 Hz; the agent's window/hop count in samples
const uint32_t BAUD_RATE = 115200;     // must match SerialBridge(baudrate=...)
const int16_t ALERT_CLASS = 1;         // LED on while the latest RESULT has this class
const uint32_t RESULT_STALE_MS = 2000;  // LED off when no RESULT came for this long
const char DEVICE_NAME[] = "arduino-sensor";

#if defined(ARDUINO_ARCH_AVR)
const float ADC_VREF = 5.0f;  // Uno, Nano, Leonardo: ADC reference is the 5 V supply
#else
const float ADC_VREF = 3.3f;  // Nano 33 IoT / BLE and most 32-bit boards
#endif
const float ADC_MAX = 1023.0f;  // 10-bit analogRead(), the default on every core

#ifndef EDGEKIT_DEBUG
#define EDGEKIT_DEBUG 0
#endif

// --------------------------------------------------------------------------- buffers

// Largest frame this sketch sends: a HELLO with a full name (or a record, if more channels).
const size_t RECORD_FRAME = edgekit::HEADER_SIZE + 4 + 4 * CHANNELS + edgekit::CRC_SIZE;
const size_t HELLO_FRAME = edgekit::HEADER_SIZE + 3 + edgekit::MAX_NAME_BYTES + edgekit::CRC_SIZE;
const size_t TX_FRAME = RECORD_FRAME > HELLO_FRAME ? RECORD_FRAME : HELLO_FRAME;

uint8_t tx_frame[TX_FRAME];
uint8_t tx_encoded[TX_FRAME + TX_FRAME / 254 + 2];  // COBS overhead + the 0x00 delimiter

// A RESULT without raw outputs is 14 bytes (16 encoded). 64 leaves room for 12 raw outputs;
// longer frames are counted as bad and skipped, so keep SerialBridge(send_outputs=False).
edgekit::FrameReader<64> reader;

// ----------------------------------------------------------------------------- state

uint16_t record_seq = 0;  // numbers sample slots: a skipped slot shows up as a gap on the host
uint16_t other_seq = 0;   // HELLO and ERROR frames have their own counter
uint32_t next_sample_ms = 0;

int16_t last_class = -1;
uint32_t last_result_ms = 0;
uint32_t blink_until_ms = 0;

// ---------------------------------------------------------------------------- sending

void send_frame(size_t len) {
  size_t n = edgekit::cobs_encode(tx_frame, len, tx_encoded);
  tx_encoded[n++] = 0;
  Serial.write(tx_encoded, n);
}

void send_hello() {
  send_frame(edgekit::build_hello(tx_frame, other_seq++, CHANNELS, SAMPLE_PERIOD_MS,
                                  DEVICE_NAME));
}

void send_error(uint8_t code, uint16_t ref_seq, const char* text) {
  send_frame(edgekit::build_error(tx_frame, other_seq++, code, ref_seq, text));
}

void sample_and_send(uint32_t now) {
  float values[CHANNELS];
  for (uint8_t i = 0; i < CHANNELS; ++i) {
    values[i] = analogRead(SENSOR_PINS[i]) * (ADC_VREF / ADC_MAX);
  }
  send_frame(edgekit::build_sensor_record(tx_frame, record_seq++, now, values, CHANNELS));
}

// -------------------------------------------------------------------------- receiving

void handle_frame(const uint8_t* frame, size_t len) {
  uint8_t type = edgekit::frame_type(frame);
  if (type == edgekit::MSG_RESULT) {
    edgekit::Result result;
    if (!edgekit::parse_result(frame, len, &result)) return;
    last_class = result.class_index;
    last_result_ms = millis();
#if EDGEKIT_DEBUG
    Serial1.print(F("window "));
    Serial1.print(result.window_seq);
    Serial1.print(F(" class "));
    Serial1.print(result.class_index);
    Serial1.print(F(" score "));
    Serial1.println(result.score, 4);
#endif
  } else if (type == edgekit::MSG_ERROR) {
    edgekit::ErrorReport error;
    if (!edgekit::parse_error(frame, len, &error)) return;
    if (error.code == edgekit::ERR_PREDICT_FAILED) blink_until_ms = millis() + 500;
#if EDGEKIT_DEBUG
    Serial1.print(F("agent error "));
    Serial1.print(error.code);
    Serial1.print(F(" for window "));
    Serial1.println(error.ref_seq);
#endif
  }
  // HELLO from the host, and types this sketch does not know, are ignored.
}

void poll_serial() {
  while (Serial.available() > 0) {
    size_t len = reader.push((uint8_t)Serial.read());
    if (len) handle_frame(reader.frame(), len);
  }
}

void update_led(uint32_t now) {
  bool on;
  if ((int32_t)(blink_until_ms - now) > 0) {
    on = (now / 50) % 2;  // fast blink: the agent could not run the model
  } else {
    bool fresh = last_result_ms != 0 && now - last_result_ms < RESULT_STALE_MS;
    on = fresh && last_class == ALERT_CLASS;
  }
  digitalWrite(LED_BUILTIN, on ? HIGH : LOW);
}

// ------------------------------------------------------------------------ setup / loop

void setup() {
  pinMode(LED_BUILTIN, OUTPUT);
  Serial.begin(BAUD_RATE);
  // Native-USB boards: give the host up to 2 s to open the port, but run without it too.
  uint32_t start = millis();
  while (!Serial && millis() - start < 2000) {
  }
#if EDGEKIT_DEBUG
  Serial1.begin(115200);
#endif
  Serial.write((uint8_t)0);  // end whatever partial frame the host's decoder holds
  send_hello();              // tells the agent we (re)started: it resets its window
  next_sample_ms = millis();
}

void loop() {
  poll_serial();

  uint32_t now = millis();
  if ((int32_t)(now - next_sample_ms) >= 0) {
    uint32_t missed = (now - next_sample_ms) / SAMPLE_PERIOD_MS;
    if (missed > 0) {
      // We fell behind (a blocked write, a slow sensor): skip the lost slots rather than
      // send a burst of late samples, and number records so the host sees the gap.
      record_seq += (uint16_t)missed;
      next_sample_ms += missed * SAMPLE_PERIOD_MS;
      send_error(edgekit::ERR_OVERRUN, record_seq, "sample overrun");
    }
    sample_and_send(now);
    next_sample_ms += SAMPLE_PERIOD_MS;
  }

  update_led(now);
}
