//! Ctrl-C and SIGTERM as a value every phase can wait on: the first one asks the demo to
//! stop (and tear down); a second Ctrl-C is reported but changes nothing, since teardown
//! must finish for the machine to be left clean.

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// Whether (and by what) the demo was asked to stop.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Option<&'static str>>);

impl Shutdown {
    /// Handles SIGINT and SIGTERM from now on (SIGHUP is ignored: a kept demo outlives
    /// its terminal).
    pub fn install() -> std::io::Result<Self> {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => continue,
                };
                if tx.borrow().is_some() {
                    eprintln!("remora-demo: {name} again; still tearing down, please wait");
                } else {
                    let _ = tx.send(Some(name));
                }
            }
        });
        Ok(Self(rx))
    }

    /// Waits for the first signal; its name.
    pub async fn wait(&mut self) -> &'static str {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or("a signal"),
            // The handler task is gone only when the runtime shuts down.
            Err(_) => std::future::pending().await,
        }
    }

    /// The signal received so far, if any.
    pub fn received(&self) -> Option<&'static str> {
        *self.0.borrow()
    }
}
