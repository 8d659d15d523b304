//! The bridge from the synchronous [`Store`](cnsm_store::Store) trait to tokio-postgres: an
//! internal tokio runtime that owns every connection, a small connection pool with prepared
//! statements per connection, and deadlines on everything (connect, pool wait, each operation).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnsm_store::StoreError;
use tokio::runtime::{Runtime, RuntimeFlavor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Config, NoTls, Statement};

/// A connection and the statements prepared on it.
pub(crate) struct Conn {
    pub(crate) client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    /// The prepared form of `sql` (prepared once per connection).
    pub(crate) async fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await.map_err(db_error)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// A connection taken from the pool; it goes back on drop unless it broke, or a transaction
/// opened with a plain `BEGIN` was still open on it.
pub(crate) struct Lease {
    conn: Option<Conn>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
    /// A transaction this lease's user opened by hand (to pipeline `BEGIN` with the first
    /// statements) is open: the connection is not reusable until it ends.
    in_transaction: std::sync::atomic::AtomicBool,
}

impl Lease {
    pub(crate) fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }

    /// Marks a hand-opened transaction as open (`true`, before sending `BEGIN`) or ended
    /// (`false`, after `COMMIT` or `ROLLBACK` came back). A lease dropped while it is open
    /// (an error, a deadline) closes its connection, which rolls the transaction back.
    pub(crate) fn set_in_transaction(&self, open: bool) {
        self.in_transaction
            .store(open, std::sync::atomic::Ordering::Relaxed);
    }

    /// The connection's client, for statements already prepared.
    pub(crate) fn client(&self) -> &Client {
        &self
            .conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
            .client
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !*self.in_transaction.get_mut()
            && !conn.client.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(conn);
        }
    }
}

struct PoolInner {
    config: Config,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

/// Connections to one database, used from the store's own runtime only.
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
    wait: Duration,
}

impl Pool {
    pub(crate) fn new(config: Config, conns_max: usize, wait: Duration) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                config,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(conns_max.max(1))),
            }),
            wait,
        }
    }

    /// An idle connection, or a new one.
    pub(crate) async fn get(&self) -> Result<Lease, StoreError> {
        let permit =
            tokio::time::timeout(self.wait, Arc::clone(&self.inner.permits).acquire_owned())
                .await
                .map_err(|_| {
                    StoreError::Io(format!(
                        "no database connection became free within {} ms",
                        self.wait.as_millis()
                    ))
                })?
                .map_err(|_| StoreError::Io("the connection pool is closed".into()))?;
        let idle = {
            let mut idle = self
                .inner
                .idle
                .lock()
                .map_err(|_| StoreError::Io("the connection pool is poisoned".into()))?;
            let mut found = None;
            while let Some(conn) = idle.pop() {
                if !conn.client.is_closed() {
                    found = Some(conn);
                    break;
                }
            }
            found
        };
        let conn = match idle {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        Ok(Lease {
            conn: Some(conn),
            pool: Arc::clone(&self.inner),
            _permit: permit,
            in_transaction: false.into(),
        })
    }

    /// A new connection; its driver task runs on the store's runtime.
    pub(crate) async fn connect(&self) -> Result<Conn, StoreError> {
        let (client, connection) = self.inner.config.connect(NoTls).await.map_err(|e| {
            StoreError::Io(format!("cannot connect to PostgreSQL: {}", describe(&e)))
        })?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server goes away; the client then reports
            // itself closed and the pool drops it.
            let _ = connection.await;
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// Drops every idle connection (after the database failed, to reconnect fresh).
    pub(crate) fn clear(&self) {
        if let Ok(mut idle) = self.inner.idle.lock() {
            idle.clear();
        }
    }
}

/// The store's own multi-thread runtime and how to wait on it from any thread.
pub(crate) struct Bridge {
    runtime: Option<Runtime>,
    op_timeout: Duration,
}

impl Bridge {
    pub(crate) fn new(op_timeout: Duration) -> Result<Bridge, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cnsm-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("cannot start the PostgreSQL runtime: {e}")))?;
        Ok(Bridge {
            runtime: Some(runtime),
            op_timeout,
        })
    }

    /// Runs `future` on the store's runtime and waits for it, with the operation deadline.
    ///
    /// Safe from any thread: a plain thread blocks on the runtime; inside a multi-thread tokio
    /// runtime (a worker, or the thread running its `block_on`) the call steps out of it first
    /// (`block_in_place`) and waits with [`wait_on`], never a nested `block_on` (see there);
    /// from a current-thread runtime the wait happens on a helper thread, because blocking that
    /// runtime's only thread inside `block_on` would panic.
    pub(crate) fn run<T: Send>(
        &self,
        future: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        let timeout = self.op_timeout;
        let bounded = async move {
            match tokio::time::timeout(timeout, future).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Io(format!(
                    "PostgreSQL did not answer within {} ms",
                    timeout.as_millis()
                ))),
            }
        };
        match tokio::runtime::Handle::try_current() {
            Err(_) => runtime.block_on(bounded),
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    let _store_runtime = runtime.enter();
                    wait_on(bounded)
                })
            }
            Ok(_) => std::thread::scope(|scope| {
                scope
                    .spawn(|| runtime.block_on(bounded))
                    .join()
                    .unwrap_or_else(|_| Err(StoreError::Io("a PostgreSQL call panicked".into())))
            }),
        }
    }
}

/// Polls `future` to completion on this thread, sleeping between polls on a signal of its own;
/// the store's runtime (entered by the caller) drives its I/O and timers from its workers.
///
/// A runtime's `block_on` sleeps on the thread's tokio parker, the same one an enclosing
/// `block_on` of the caller's runtime sleeps on when this call comes from the future it runs.
/// A wake-up for that outer future (say, the answer to another request in the same `join!`)
/// arriving during the nested wait would unpark the nested `block_on` and be used up there,
/// and the outer future would sleep on with its answer ready until something else woke it.
/// This wait leaves the thread's parker alone, so such a wake-up stays pending for the outer
/// future.
fn wait_on<F: Future>(future: F) -> F::Output {
    use std::sync::{Condvar, PoisonError};
    use std::task::{Context, Poll, Wake, Waker};

    #[derive(Default)]
    struct Signal {
        woken: Mutex<bool>,
        condvar: Condvar,
    }
    impl Wake for Signal {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            *self.woken.lock().unwrap_or_else(PoisonError::into_inner) = true;
            self.condvar.notify_one();
        }
    }

    let signal = Arc::new(Signal::default());
    let waker = Waker::from(Arc::clone(&signal));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        let mut woken = signal.woken.lock().unwrap_or_else(PoisonError::into_inner);
        while !*woken {
            woken = signal
                .condvar
                .wait(woken)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *woken = false;
    }
}

impl Bridge {
    /// Runs a background task on the store's runtime.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(task);
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's context panics; this does not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A database error as a [`StoreError`]: broken chains and duplicate records are corruption
/// (the batch is refused as a whole), everything else is I/O.
pub(crate) fn db_error(error: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code) if *code == SqlState::DATA_CORRUPTED || *code == SqlState::UNIQUE_VIOLATION => {
            StoreError::Corrupt(describe(&error))
        }
        _ => StoreError::Io(format!("PostgreSQL: {}", describe(&error))),
    }
}

/// The server's message when there is one (the `Display` of a db error is only "db error").
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

/// True for errors worth retrying the whole transaction for (deadlock, serialization).
pub(crate) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(error.code(), Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// LISTENs on a schema's commit channel and reports commits of other handles; reconnects
/// (every second) while the database is away.
pub(crate) struct CommitFeed {
    pub(crate) config: Config,
    pub(crate) channel: String,
    pub(crate) origin: String,
    pub(crate) closed: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) on_commit: Arc<dyn Fn(u64, u64) + Send + Sync>,
}

impl CommitFeed {
    pub(crate) async fn run(self) {
        use std::sync::atomic::Ordering;
        while !self.closed.load(Ordering::SeqCst) {
            let _ = self.listen().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One connection's life: returns when it breaks or the store is dropped.
    async fn listen(&self) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        use std::sync::atomic::Ordering;
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Io(describe(&e)))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The connection must be polled for LISTEN to complete; its messages go to `rx`.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", self.channel))
            .await
            .map_err(db_error)?;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                Ok(Some(payload)) => {
                    let mut parts = payload.split(' ');
                    if parts.next() == Some(self.origin.as_str()) {
                        continue;
                    }
                    for pair in parts {
                        if let Some((uid, version)) = pair.split_once(':')
                            && let (Ok(uid), Ok(version)) = (uid.parse(), version.parse())
                        {
                            (self.on_commit)(uid, version);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    if client.is_closed() {
                        break;
                    }
                }
            }
        }
        drop(client);
        driver.abort();
        Ok(())
    }
}
