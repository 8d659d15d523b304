//! The pure core of cnsm: the `StateMachine` resource, its admission, the transition engine,
//! and the hash-chained history record.
//!
//! Nothing here does I/O, reads a clock or touches a global: time is passed in as milliseconds
//! since the Unix epoch, and every side effect (timers to arm) is returned as data.
//!
//! ```
//! use cnsm_core::{admission, engine::Machine};
//! let yaml = r#"
//! apiVersion: statemachine.cn/v1alpha1
//! kind: StateMachine
//! metadata: {name: door}
//! spec:
//!   initialState: closed
//!   states:
//!   - {name: closed, type: task, timeoutSeconds: 60, onEvent: [{event: open, target: opened}]}
//!   - {name: opened, type: final}
//! "#;
//! let machine = admission::admit_str(yaml, None).into_result().unwrap();
//! let machine = Machine::compile(machine).unwrap();
//! assert_eq!(machine.definition().spec.initial_state, "closed");
//! ```

pub mod admission;
pub mod cbor;
pub mod diff;
pub mod engine;
pub mod erasure;
pub mod error;
pub mod expr;
pub mod fastexpr;
pub mod flags;
pub mod graph;
pub mod instance;
pub mod migration;
pub mod record;
pub mod resource;
pub mod rollout;
pub mod snapshot;
mod yaml;

pub use error::TransitionError;
pub use instance::{Instance, Status};
pub use record::{Hash32, SealedRecord, StateChangeEvent};
pub use resource::StateMachine;
