//! RTCP (placeholder while the full parser lands).
