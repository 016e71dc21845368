//! `share_one_context`, in a test binary of its own since it changes the whole process: many
//! services in one process then run one set of ZeroMQ threads, and still talk to each other.

use proto::{share_one_context, Ping, RequestContext, Rpc, RpcOptions};

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_services_in_one_process_share_one_context_and_still_answer() {
    share_one_context();
    let before = threads();
    let mut servers = Vec::new();
    for _ in 0..300 {
        let (server, incoming) =
            Rpc::start(log(), Some("tcp://127.0.0.1:*"), RpcOptions::default()).expect("bind");
        let mut incoming = incoming.expect("receiver");
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                request.reply::<Ping>(Ok("pong".into()));
            }
        });
        servers.push(server);
    }
    // A context of their own would be two threads each (an I/O thread and a reaper); 300
    // services take two shared contexts.
    let started = threads() - before;
    assert!(started < 10, "{started} threads for 300 services");

    let (client, _) = Rpc::start(log(), None, RpcOptions::default()).expect("client");
    let context = RequestContext::internal("");
    for server in &servers {
        let endpoint = server.endpoint().expect("endpoint");
        let answer = client.call(endpoint, &context, &Ping {}).await;
        assert_eq!(answer.expect("answered"), "pong");
    }
    client.shutdown();
    for server in &servers {
        server.shutdown();
    }
}
