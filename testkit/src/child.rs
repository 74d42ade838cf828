//! Reading a child process's standard output (or error) in tests that kill it.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Reads `stdout` (or a child's standard error) on a thread (so the child never blocks on its
/// pipe: it must be busy when a test kills it) and sends each whole line, without its newline. A line cut short by a kill
/// is dropped: it says nothing. The thread ends at end of output or when the receiver is gone.
pub fn whole_lines(stdout: impl Read + Send + 'static) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let mut stdout = BufReader::new(stdout);
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    (rx, reader)
}
