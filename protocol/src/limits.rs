//! Documented size limits. Every decoder checks a length against these before allocating.

/// Largest chat text, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Largest encoded body inside an envelope.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest encoded envelope (body plus header and signature).
pub const MAX_ENVELOPE_BYTES: usize = MAX_BODY_BYTES + 1024;

/// Most envelopes in one `/kith/dm/1` request.
pub const MAX_DM_BATCH: usize = 64;

/// Most bytes (sum of each envelope's size bound) the envelopes after the first may carry in one
/// `/kith/dm/1` request.
pub const MAX_DM_BATCH_BYTES: usize = 256 * 1024;

/// Largest `/kith/dm/1` frame: one envelope of any size, a batch's further envelopes, and
/// request framing.
pub const MAX_DM_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + MAX_DM_BATCH_BYTES + 1024;

/// Largest `/kith/mailbox/1` frame: a fetch answer carries up to [`MAX_FETCH_BATCH`] envelopes.
pub const MAX_MAILBOX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Most envelopes in one mailbox fetch answer.
pub const MAX_FETCH_BATCH: u32 = 256;

/// Most message ids in one receipt or one mailbox ack.
pub const MAX_IDS_PER_BATCH: usize = 1024;

/// Length of the frame header (a big-endian `u32`).
pub const FRAME_HEADER_BYTES: usize = 4;
