//! `queue show`: the scheduler's host queues, asked of the scheduler itself over RPC (the
//! `build_queue` call, which rebuilds the queue first, so the answer is current).

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use proto::service::RpcConfig;
use proto::{ProtoError, QueueSummary, RebuildQueue, RequestContext, Rpc};

use super::{json_text, table, Format, ManageError};

#[derive(Debug, Subcommand)]
pub(super) enum QueueCommand {
    /// Rebuilds the scheduler's host queue now and shows it: hosts per queue, and the hosts left
    /// out (disabled, down) with the reason.
    Show {
        /// The scheduler to ask (default: [rpc] scheduler).
        #[arg(long)]
        scheduler: Option<String>,
        /// How long to wait for its answer.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_ms: u64,
    },
}

pub(super) fn run(
    config: &RpcConfig,
    command: QueueCommand,
    format: Format,
) -> Result<String, ManageError> {
    let QueueCommand::Show {
        scheduler,
        timeout_ms,
    } = command;
    let endpoint = scheduler.unwrap_or_else(|| config.scheduler.clone());
    let summary = ask_scheduler(config, &endpoint, Duration::from_millis(timeout_ms))?;
    Ok(queue_output(&endpoint, &summary, format))
}

/// One `build_queue` call on a client-only transport (no socket of its own is bound), with the
/// configuration's sockets and CURVE keys.
fn ask_scheduler(
    config: &RpcConfig,
    endpoint: &str,
    timeout: Duration,
) -> Result<QueueSummary, ManageError> {
    let mut options = config.options();
    options.call_timeout = timeout;
    let failed = |source: ProtoError| match source {
        ProtoError::Config(reason) => ManageError::Config(reason),
        source => ManageError::Scheduler {
            endpoint: endpoint.to_string(),
            source,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(ProtoError::Thread(e.to_string())))?;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let (rpc, _) = Rpc::start(log, None, options).map_err(failed)?;
    let answer =
        runtime.block_on(rpc.call(endpoint, &RequestContext::internal(""), &RebuildQueue {}));
    rpc.shutdown();
    answer.map_err(failed)
}

fn queue_output(endpoint: &str, summary: &QueueSummary, format: Format) -> String {
    match format {
        Format::Json => json_text(&json!({
            "scheduler": endpoint,
            "queues": summary.queues,
            "unavailable": summary.unavailable,
            "hosts": summary.hosts,
        })),
        Format::Table => {
            let mut out = table(
                &["QUEUE", "HOSTS"],
                summary
                    .queues
                    .iter()
                    .map(|(queue, hosts)| vec![queue.clone(), hosts.to_string()]),
            );
            if !summary.hosts.is_empty() {
                out.push('\n');
                out.push_str(&table(
                    &[
                        "QUEUE",
                        "POSITION",
                        "HOST",
                        "FREE VCPUS",
                        "FREE RAM MB",
                        "FREE DISK GB",
                    ],
                    summary.hosts.iter().enumerate().map(|(at, h)| {
                        vec![
                            h.queue.clone(),
                            (1 + summary.hosts[..at]
                                .iter()
                                .filter(|o| o.queue == h.queue)
                                .count())
                            .to_string(),
                            h.hostname.clone(),
                            format!("{:.1}", h.free_vcpus),
                            format!("{:.0}", h.free_memory_mb),
                            format!("{:.0}", h.free_local_gb),
                        ]
                    }),
                ));
            }
            out.push('\n');
            if summary.unavailable.is_empty() {
                out.push_str("every host is available\n");
            } else {
                out.push_str(&table(
                    &["UNAVAILABLE", "REASON"],
                    summary
                        .unavailable
                        .iter()
                        .map(|(host, why)| vec![host.clone(), why.clone()]),
                ));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_and_unavailable_hosts_are_shown() {
        let summary = QueueSummary {
            queues: [("kvm".to_string(), 3), ("gpu".to_string(), 1)].into(),
            unavailable: [("node-4".to_string(), "disabled: maintenance".to_string())].into(),
            hosts: Vec::new(),
        };
        let text = queue_output("tcp://127.0.0.1:5561", &summary, Format::Table);
        assert_eq!(
            text,
            "QUEUE  HOSTS\ngpu    1\nkvm    3\n\nUNAVAILABLE  REASON\nnode-4       disabled: maintenance\n"
        );
        let value: serde_json::Value =
            serde_json::from_str(&queue_output("tcp://x:1", &summary, Format::Json)).unwrap();
        assert_eq!(value["queues"]["kvm"], 3);
        assert_eq!(value["unavailable"]["node-4"], "disabled: maintenance");

        let with_hosts = QueueSummary {
            hosts: vec![
                proto::QueuedHost {
                    queue: "kvm".into(),
                    hostname: "node-1".into(),
                    free_vcpus: 15.0,
                    free_memory_mb: 3584.0,
                    free_local_gb: 39.0,
                },
                proto::QueuedHost {
                    queue: "kvm".into(),
                    hostname: "node-2".into(),
                    free_vcpus: 32.0,
                    free_memory_mb: 8192.0,
                    free_local_gb: 80.0,
                },
            ],
            ..summary
        };
        let text = queue_output("tcp://x:1", &with_hosts, Format::Table);
        assert!(text.contains("kvm    2         node-2  32.0"), "{text}");
        assert_eq!(value["scheduler"], "tcp://x:1");
        let none = QueueSummary {
            queues: Default::default(),
            unavailable: Default::default(),
            hosts: Vec::new(),
        };
        assert!(queue_output("e", &none, Format::Table).ends_with("every host is available\n"));
    }

    #[test]
    fn a_scheduler_that_does_not_answer_is_an_error_within_the_timeout() {
        // A port nothing listens on: the call can only time out.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let started = std::time::Instant::now();
        let err = run(
            &RpcConfig::default(),
            QueueCommand::Show {
                scheduler: Some(format!("tcp://127.0.0.1:{port}")),
                timeout_ms: 300,
            },
            Format::Table,
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, ManageError::Scheduler { .. }), "{err}");
        assert_eq!(err.exit_code(), std::process::ExitCode::FAILURE);
        let text = err.to_string();
        assert!(
            text.contains("did not give its queue") && text.contains("not answered"),
            "{text}"
        );
    }

    #[test]
    fn the_scheduler_is_asked_for_its_queue() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let (scheduler, incoming) = Rpc::start(
            log,
            Some("tcp://127.0.0.1:*"),
            RpcConfig::default().options(),
        )
        .unwrap();
        let endpoint = scheduler.endpoint().unwrap().to_string();
        let mut incoming = incoming.unwrap();
        let answering = std::thread::spawn(move || {
            let request = incoming.blocking_recv().unwrap();
            assert_eq!(request.method(), "build_queue");
            request.reply::<RebuildQueue>(Ok(QueueSummary {
                queues: [("kvm".to_string(), 3)].into(),
                unavailable: Default::default(),
                hosts: Vec::new(),
            }));
            // Keep the transport up until the reply is out.
            std::thread::sleep(Duration::from_millis(500));
            scheduler.shutdown();
        });
        let config = RpcConfig {
            scheduler: endpoint.clone(),
            ..RpcConfig::default()
        };
        let text = run(
            &config,
            QueueCommand::Show {
                scheduler: None,
                timeout_ms: 5000,
            },
            Format::Json,
        )
        .unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["queues"]["kvm"], 3);
        assert_eq!(value["scheduler"], endpoint.as_str());
        answering.join().unwrap();
    }
}
