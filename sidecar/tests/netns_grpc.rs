//! gRPC through the proxy pair, in network namespaces (root; the prerequisites of
//! `tests/netns.rs`): a real tonic gRPC server in the server pod and a real tonic client in
//! the client pod, both intercepted by `remora-init`'s rules, the proxies (UID 1337)
//! speaking mTLS to each other. The services need no protoc: `tonic-health`
//! (`grpc.health.v1.Health`: unary `Check`, server-streaming `Watch`) and
//! `tonic-reflection` (`grpc.reflection.v1.ServerReflection/ServerReflectionInfo`, a
//! bidirectional stream) ship their generated server and client code.
//!
//! How the peers get into the namespaces: the test re-executes its own binary with
//! `ip netns exec <pod> env REMORA_NETNS_GRPC_PEER=server|client <test binary> --exact
//! <this test> --nocapture`. With that variable set, the same `#[test]` function plays the
//! peer instead of orchestrating: the server serves until the orchestrator kills it (a
//! `Proc` guard), the client makes every call, asserts on the answers and exits non-zero
//! (a failed test) if one is wrong. So no extra binary, example or codegen step, and the
//! peers are the very tonic code a user runs. Namespaces, veths and processes are removed
//! by the guards of `common::netns`, also on failure.

mod common;

use std::{process::Stdio, time::Duration};

use common::netns::{FRONTEND, REVIEWS, SERVER_IP, check_prerequisites, metric, pods, wait_for};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, health_check_response::ServingStatus as Wire,
        health_client::HealthClient,
    },
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse,
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

/// Set (to `server` or `client`) in the re-executed peer processes.
const PEER: &str = "REMORA_NETNS_GRPC_PEER";
const TEST: &str = "grpc_unary_streams_and_errors_ride_mtls_between_two_pods";
const GRPC_PORT: u16 = 50051;
/// A health-checked service the server flaps: SERVING, NOT_SERVING, then unregistered
/// (which ends every `Watch` of it with `grpc-status: 0`), over and over.
const FLAPPING: &str = "remora.test.Flapping";
const CLIENT_DONE: &str = "grpc client: every call passed";

#[test]
fn grpc_unary_streams_and_errors_ride_mtls_between_two_pods() {
    match std::env::var(PEER).as_deref() {
        Ok("server") => return serve(),
        Ok("client") => return client(),
        Ok(other) => panic!("{PEER}={other}: expected server or client"),
        Err(_) => {}
    }
    check_prerequisites();
    let mut pods = pods();
    let (server_id, client_id) = pods.identities();
    let me = std::env::current_exe().expect("test binary");
    let me = me.display().to_string();
    let peer = |role: &str| -> Vec<String> {
        [
            "env",
            &format!("{PEER}={role}"),
            &me,
            "--exact",
            TEST,
            "--nocapture",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let server_args = peer("server");
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    pods.spawn(true, "grpc-server", &server_args);
    wait_for(
        "gRPC server listening",
        || pods.log("grpc-server").contains("grpc server: listening"),
        || pods.log("grpc-server"),
    );
    let server_cfg = pods.write(
        "server.yaml",
        &format!(
            "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n",
            server_id.yaml()
        ),
    );
    // Protocol left to detection: the client proxy must recognise the HTTP/2 preface.
    let client_cfg = pods.write(
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n  - name: grpc.shop\n    addresses: [\"{SERVER_IP}:{GRPC_PORT}\"]\n    endpoints:\n    - {{address: \"{SERVER_IP}:{GRPC_PORT}\", identity: \"{REVIEWS}\", meshed: true}}\n",
            client_id.yaml()
        ),
    );
    pods.proxy(true, &server_cfg);
    pods.proxy(false, &client_cfg);

    let client_args = peer("client");
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let out = pods
        .client
        .cmd(&client_args)
        .stdin(Stdio::null())
        .output()
        .expect("run the gRPC client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(CLIENT_DONE),
        "gRPC client failed ({:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- grpc-server ---\n{}\n{}",
        out.status,
        pods.log("grpc-server"),
        pods.proxy_logs()
    );
    // Every call went through both proxies, over mTLS: the server pod's proxy saw the
    // client's SPIFFE ID (gRPC answers HTTP 200 also for a NOT_FOUND status).
    let inbound = metric(
        &pods.server,
        &format!(
            r#"remora_proxy_requests_total{{direction="inbound",status="200",peer_identity="{FRONTEND}"}}"#
        ),
    )
    .unwrap_or(0);
    assert!(
        inbound >= 5,
        "inbound gRPC requests from {FRONTEND}: {inbound}\n{}",
        pods.proxy_logs()
    );
    assert!(
        metric(
            &pods.client,
            r#"remora_proxy_tls_handshakes_total{direction="outbound",outcome="ok"}"#
        )
        .unwrap_or(0)
            >= 1,
        "{}",
        pods.proxy_logs()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The server peer (server pod): health and reflection on `0.0.0.0:50051`, plaintext
/// HTTP/2 as an app in a meshed pod serves; runs until killed.
fn serve() {
    runtime().block_on(async {
        let (mut reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("reflection service");
        tokio::spawn(async move {
            loop {
                reporter
                    .set_service_status(FLAPPING, ServingStatus::Serving)
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                reporter
                    .set_service_status(FLAPPING, ServingStatus::NotServing)
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                // Drops the status sender: open Watch streams of it end.
                reporter.clear_service_status(FLAPPING).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let incoming =
            TcpIncoming::bind(([0, 0, 0, 0], GRPC_PORT).into()).expect("bind the gRPC port");
        println!("grpc server: listening");
        Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(incoming)
            .await
            .expect("gRPC server");
    });
}

/// The client peer (client pod): every call goes to the server pod's address and is
/// captured by the client pod's proxy.
fn client() {
    runtime().block_on(async {
        let channel = Channel::from_shared(format!("http://{SERVER_IP}:{GRPC_PORT}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .expect("connect through the client proxy");
        unary(channel.clone()).await;
        server_streaming(channel.clone()).await;
        bidirectional(channel).await;
    });
    println!("{CLIENT_DONE}");
}

fn grpc_status(map: &tonic::metadata::MetadataMap) -> Option<&str> {
    map.get("grpc-status").and_then(|v| v.to_str().ok())
}

/// Unary `Check`: the answer and its `grpc-status: 0` trailer (tonic merges the trailers
/// of a unary call into the response metadata); an unknown service's NOT_FOUND status and
/// message arrive intact (a trailers-only response).
async fn unary(channel: Channel) {
    let mut health = HealthClient::new(channel);
    let resp = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check(\"\")");
    assert_eq!(
        resp.metadata()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/grpc")
    );
    assert_eq!(
        grpc_status(resp.metadata()),
        Some("0"),
        "the grpc-status trailer arrived: {:?}",
        resp.metadata()
    );
    assert_eq!(resp.into_inner().status(), Wire::Serving);

    let err = health
        .check(HealthCheckRequest {
            service: "remora.test.Missing".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "service not registered", "{err:?}");
    println!("grpc client: unary ok, NOT_FOUND ok");
}

/// Server-streaming `Watch` of the flapping service: messages arrive one by one as the
/// status changes (SERVING, then NOT_SERVING 150 ms later), and the stream ends with a
/// `grpc-status: 0` trailer when the server unregisters the service. A watch that starts
/// mid-cycle sees only part of it, so it is repeated until one sees a whole cycle.
async fn server_streaming(channel: Channel) {
    let mut health = HealthClient::new(channel);
    let mut partial = Vec::new();
    for _ in 0..50 {
        let stream = health
            .watch(HealthCheckRequest {
                service: FLAPPING.into(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            // Between two cycles the service is not registered.
            Err(status) if status.code() == Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(status) => panic!("Watch: {status:?}"),
        };
        let mut seen = Vec::new();
        while let Some(msg) = stream.message().await.expect("Watch message") {
            seen.push(msg.status());
        }
        let trailers = stream
            .trailers()
            .await
            .expect("Watch trailers")
            .expect("the Watch stream ended with trailers");
        assert_eq!(grpc_status(&trailers), Some("0"), "{trailers:?}");
        if seen == [Wire::Serving, Wire::NotServing] {
            println!("grpc client: server streaming ok");
            return;
        }
        partial.push(seen);
    }
    panic!("no Watch saw a whole SERVING, NOT_SERVING cycle: {partial:?}");
}

/// One `ServerReflectionInfo` conversation: requests go out one at a time.
struct Conversation {
    tx: tokio::sync::mpsc::Sender<ServerReflectionRequest>,
    responses: tonic::Streaming<ServerReflectionResponse>,
}

impl Conversation {
    /// Opens the stream with `first` already queued.
    async fn open(reflection: &mut ServerReflectionClient<Channel>, first: MessageRequest) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut conversation = Self {
            tx,
            responses: reflection
                .server_reflection_info(ReceiverStream::new(rx))
                .await
                .expect("ServerReflectionInfo")
                .into_inner(),
        };
        conversation.send(first).await;
        conversation
    }

    async fn send(&mut self, m: MessageRequest) {
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        self.tx.send(req).await.expect("send a reflection request");
    }

    /// The answer to the request just sent (or the status that ended the stream).
    async fn answer(&mut self) -> Result<MessageResponse, tonic::Status> {
        let resp = self
            .responses
            .message()
            .await?
            .expect("an answer before the end of the stream");
        Ok(resp.message_response.expect("a message_response"))
    }
}

/// Bidirectional `ServerReflectionInfo`: each request is answered before the next one is
/// sent (so both directions stay open together); closing the request stream ends the
/// response stream with `grpc-status: 0`. On a second stream, an unknown symbol ends the
/// conversation with a NOT_FOUND status after a first good answer.
async fn bidirectional(channel: Channel) {
    let mut reflection = ServerReflectionClient::new(channel);
    let list = MessageRequest::ListServices(String::new());
    let mut c = Conversation::open(&mut reflection, list.clone()).await;
    let Ok(MessageResponse::ListServicesResponse(list_answer)) = c.answer().await else {
        panic!("ListServices is answered with the services");
    };
    let names: Vec<&str> = list_answer
        .service
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        names.contains(&"grpc.health.v1.Health")
            && names.contains(&"grpc.reflection.v1.ServerReflection"),
        "{names:?}"
    );
    c.send(MessageRequest::FileContainingSymbol(
        "grpc.health.v1.Health".into(),
    ))
    .await;
    let Ok(MessageResponse::FileDescriptorResponse(files)) = c.answer().await else {
        panic!("FileContainingSymbol is answered with file descriptors");
    };
    assert!(
        files.file_descriptor_proto.iter().any(|f| f
            .windows(b"grpc.health.v1".len())
            .any(|w| w == b"grpc.health.v1")),
        "the health service's file descriptor"
    );
    let Conversation { tx, mut responses } = c;
    drop(tx);
    assert!(
        responses.message().await.expect("end of stream").is_none(),
        "the response stream ends once the requests do"
    );
    let trailers = responses
        .trailers()
        .await
        .expect("trailers")
        .expect("the stream ended with trailers");
    assert_eq!(grpc_status(&trailers), Some("0"), "{trailers:?}");

    // A second stream ends in an error status after its first answer: the NOT_FOUND
    // trailers (with their message) end it mid-conversation.
    let mut c = Conversation::open(&mut reflection, list).await;
    c.answer().await.expect("ListServices answer");
    c.send(MessageRequest::FileContainingSymbol(
        "remora.test.Missing".into(),
    ))
    .await;
    let err = c
        .answer()
        .await
        .expect_err("an unknown symbol ends the stream with NOT_FOUND");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        err.message(),
        "symbol 'remora.test.Missing' not found",
        "{err:?}"
    );
    println!("grpc client: bidirectional streaming ok, NOT_FOUND mid-stream ok");
}
