//! The embedded, durable default backend on redb (being written).

/// The embedded store.
#[derive(Debug)]
pub struct EmbeddedStore;
