//! End-to-end tests of the HTTP API over real HTTP on 127.0.0.1: every route, every error
//! status, CloudEvents, concurrency contracts, watch streams, health and shutdown; and HTTPS
//! (`tls`).

mod api;
mod auth;
mod cloudevents;
mod concurrency;
mod controls;
mod delivery;
mod erase;
mod flags;
mod health;
mod openapi;
mod snapshot;
mod support;
mod tls;
mod watch;
