//! The backend-agnostic conformance suite (being written).
