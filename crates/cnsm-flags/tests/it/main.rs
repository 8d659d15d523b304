//! Integration tests of cnsm-flags.
