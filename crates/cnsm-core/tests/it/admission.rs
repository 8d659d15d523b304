//! Admission suite
