//! The embedded MQTT broker: MQTT 3.1.1 and 5.0 clients, QoS 0 and 1,
//! retained messages, persistent sessions with bounded queues.

pub mod broker;
pub mod codec;
mod connection;
mod queue;
pub mod sink;
mod store;
pub mod topic;
mod tree;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::listener::AcceptFailures;

pub use broker::{Broker, BrokerConfig, Message};
pub use sink::{Sink, Ticket};

/// Accepts MQTT clients on `listener` forever, one task per connection.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>) {
    let mut failures = AcceptFailures::new("mqtt");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failures.accepted();
                // Counted here, before the task runs, so a burst of
                // connections cannot overtake the bound.
                let stats = &broker.stats;
                let open = stats.connections.load(Ordering::Relaxed)
                    - stats.closed.load(Ordering::Acquire);
                if open >= broker.config.max_connections as u64 {
                    stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                    drop(stream); // closed at once, nothing read
                    continue;
                }
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection::serve(stream, broker.clone()));
            }
            Err(err) => failures.failed(err, &broker.stats.accept_errors).await,
        }
    }
}
