//! The request budget on the paused clock, over in-memory streams.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};

use super::*;

impl ClientStream for DuplexStream {}

const KIB: usize = 1024;
const LONG: Duration = Duration::from_secs(600);
const TIMEOUTS: ReadTimeouts = ReadTimeouts { idle: LONG, request: LONG };

/// The head and `n` bytes (about) of header lines of a request, without
/// the empty line that ends it.
fn request_head(n: usize) -> Vec<u8> {
    let mut r = b"GET status\nColumns: program_version\n".to_vec();
    let line = format!("X-Pad: {}\n", "p".repeat(1000));
    while r.len() < n {
        r.extend_from_slice(line.as_bytes());
    }
    r
}

/// A client sending `head` now, and the rest of its request (the empty
/// line) when `finish` is told.
fn client(head: Vec<u8>) -> (DuplexStream, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (mut ours, theirs) = tokio::io::duplex(64 * KIB);
    let (finish, go) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // A reader refused mid-request stops reading: the write fails then.
        if ours.write_all(&head).await.is_ok() && go.await.is_ok() {
            let _ = ours.write_all(b"\n").await;
        }
        // Keep the stream open until the reader is done with it.
        let _ = tokio::io::AsyncReadExt::read(&mut ours, &mut [0u8; 1]).await;
    });
    (theirs, finish, task)
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never: {what}");
}

#[tokio::test(start_paused = true)]
async fn small_requests_cost_the_budget_nothing() {
    let budget = RequestBudget::new(1 << 20, LONG);
    let (mut ours, mut theirs) = tokio::io::duplex(64 * KIB);
    ours.write_all(b"GET hosts\nColumns: name\n\nGET status\n\n").await.unwrap();
    let mut r = RequestReader::new(budget.clone());
    let stop = CancellationToken::new();
    let first = r.next(&mut theirs, &Limits::default(), TIMEOUTS, &stop, &mut None).await.unwrap().unwrap();
    assert_eq!(r.request(first), b"GET hosts\nColumns: name\n\n");
    let second = r.next(&mut theirs, &Limits::default(), TIMEOUTS, &stop, &mut None).await.unwrap().unwrap();
    assert_eq!(r.request(second), b"GET status\n\n");
    assert_eq!(budget.usage().memory_used, 0);
    assert_eq!(budget.usage().waits, 0);
}

#[tokio::test(start_paused = true)]
async fn a_large_request_is_charged_while_it_arrives_and_given_back_after_it_is_done() {
    let budget = RequestBudget::new(16 << 20, LONG);
    let head = request_head(2 << 20);
    let (mut stream, finish, writer) = client(head.clone());
    let (b, stop) = (budget.clone(), CancellationToken::new());
    let reading = tokio::spawn(async move {
        let mut r = RequestReader::new(b);
        let block = r.next(&mut stream, &Limits::default(), TIMEOUTS, &stop, &mut None).await.unwrap().unwrap();
        (r, stream, block)
    });
    // Most of the request is in livemux's buffer (the rest in the pipe).
    let arrived = (1 + COPIES) * (head.len() - 64 * KIB - UNBUDGETED_BYTES);
    until("the head is buffered", || budget.usage().memory_used >= arrived).await;
    // Doubling, capped: never more than twice what arrived.
    assert!(budget.usage().memory_used <= 2 * (1 + COPIES) * head.len(), "{:?}", budget.usage());
    finish.send(()).unwrap();
    let (mut r, mut stream, block) = reading.await.unwrap();
    assert_eq!(r.request(block.clone()).len(), head.len() + 1);
    // Charged while the request is being answered, with its copies ...
    assert!(budget.usage().memory_used >= (1 + COPIES) * (block.len() - UNBUDGETED_BYTES), "{:?}", budget.usage());
    // ... and given back once the next one is awaited.
    let stop = CancellationToken::new();
    let next =
        tokio::spawn(async move { r.next(&mut stream, &Limits::default(), TIMEOUTS, &stop, &mut None).await.is_ok() });
    until("the charge is given back", || budget.usage().memory_used == 0).await;
    next.abort();
    writer.abort();
}

/// Two clients whose requests do not both fit: the second waits, and goes
/// on when the first is done.
#[tokio::test(start_paused = true)]
async fn a_client_over_the_budget_waits_and_goes_on_when_room_comes() {
    // a's request and its copies hold about 1.3 MiB, b's 2.4 MiB.
    let budget = RequestBudget::new(3 << 20, Duration::from_secs(30));
    let stop = CancellationToken::new();
    // a's request arrives first and is complete.
    let (mut a_stream, a_finish, a_writer) = client(request_head(400 * KIB));
    a_finish.send(()).unwrap();
    let mut a = RequestReader::new(budget.clone());
    let a_block = a.next(&mut a_stream, &Limits::default(), TIMEOUTS, &stop, &mut None).await.unwrap().unwrap();
    // b's does not fit beside it while a is being answered.
    let (b_stream, b_finish, b_writer) = client(request_head(700 * KIB));
    b_finish.send(()).unwrap();
    let (b_budget, b_stop) = (budget.clone(), stop.clone());
    let b = tokio::spawn(async move {
        let mut s = b_stream;
        let mut r = RequestReader::new(b_budget);
        r.next(&mut s, &Limits::default(), TIMEOUTS, &b_stop, &mut None).await.map(|b| b.map(|b| b.len()))
    });
    until("b waits for room", || budget.usage().waits >= 1).await;
    assert!(!b.is_finished());
    // a is answered; its buffer goes; b goes on.
    assert_eq!(a.request(a_block).len(), request_head(400 * KIB).len() + 1);
    drop(a);
    let got = tokio::time::timeout(Duration::from_secs(5), b).await.expect("b went on").unwrap();
    assert_eq!(got.unwrap(), Some(request_head(700 * KIB).len() + 1));
    assert_eq!(budget.usage().refused, 0);
    assert_eq!(budget.usage().memory_used, 0);
    a_writer.abort();
    b_writer.abort();
}

#[tokio::test(start_paused = true)]
async fn no_room_within_request_memory_wait_is_a_503_naming_the_budget() {
    let budget = RequestBudget::new(1 << 20, Duration::from_secs(2));
    let (mut a_stream, _a_finish, a_writer) = client(request_head(200 * KIB));
    let (b_budget, stop) = (budget.clone(), CancellationToken::new());
    let a_stop = stop.clone();
    // a holds most of the budget and never finishes its request.
    let a = tokio::spawn(async move {
        let mut r = RequestReader::new(b_budget);
        let _ = r.next(&mut a_stream, &Limits::default(), TIMEOUTS, &a_stop, &mut None).await;
    });
    until("a holds the budget", || budget.usage().memory_used > 512 * KIB).await;
    let held_by_a = budget.usage().memory_used;
    let (mut b_stream, _b_finish, b_writer) = client(request_head(900 * KIB));
    let mut b = RequestReader::new(budget.clone());
    let began = Instant::now();
    let err = match b.next(&mut b_stream, &Limits::default(), TIMEOUTS, &stop, &mut None).await {
        Err(ReadError::Refused(e)) => e,
        Err(ReadError::Io(e)) => panic!("an I/O error instead of a refusal: {e}"),
        Ok(_) => panic!("b's request was received although the budget was full"),
    };
    // Within request_memory_wait, not client_request_timeout.
    assert_eq!(began.elapsed(), Duration::from_secs(2));
    assert_eq!(err.status(), Status::Busy);
    let text = err.to_string();
    assert!(text.contains("1048576 bytes of request_memory_budget"), "{text}");
    assert!(text.contains("waited 2000 ms for room (request_memory_wait)"), "{text}");
    drop(b);
    assert_eq!(budget.usage().memory_used, held_by_a, "b's share given back, a's kept");
    assert_eq!((budget.usage().waits, budget.usage().refused), (1, 1));
    a.abort();
    a_writer.abort();
    b_writer.abort();
}

#[tokio::test(start_paused = true)]
async fn a_budget_reloaded_smaller_than_a_request_refuses_it_at_once() {
    let budget = RequestBudget::new(8 << 20, Duration::from_secs(30));
    budget.set(64 * KIB, Duration::from_secs(30));
    let (mut s, _finish, writer) = client(request_head(200 * KIB));
    let mut r = RequestReader::new(budget.clone());
    let began = Instant::now();
    let refused = r.next(&mut s, &Limits::default(), TIMEOUTS, &CancellationToken::new(), &mut None).await;
    assert!(matches!(refused, Err(ReadError::Refused(Refusal::Budget { .. }))));
    assert!(began.elapsed() < Duration::from_secs(1), "no wait for what can never fit");
    writer.abort();
}
