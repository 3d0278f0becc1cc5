//! The embedded MQTT broker: MQTT 3.1.1 and 5.0 clients, QoS 0 and 1,
//! retained messages, persistent sessions with bounded queues.

pub mod broker;
pub mod codec;
mod connection;
mod store;
pub mod topic;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use broker::{Broker, BrokerConfig, Message};

/// Accepts MQTT clients on `listener` forever, one task per connection.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
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
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "MQTT accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
