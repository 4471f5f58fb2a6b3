//! Finishes small regular files on a second thread, so that a layer of many small files
//! keeps two cores busy as one `tar -x` cannot.
//!
//! The applier still makes every change to the tree itself, in archive order: it creates
//! each file (`O_EXCL`, in the directory it resolved) and hands over only the open
//! descriptor with the file's content and header. The worker writes the content and sets
//! owner, xattrs, mode and times through the descriptor, so nothing it does depends on a
//! path. What the applier does later to the same path (replace, remove, whiteout) acts on
//! the name and leaves a handed-over descriptor harmless; a hard link is the one entry that
//! reads a file's metadata back, so the applier waits for the worker before each
//! ([`Handoff::wait`]).

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, SyncSender};

use super::stream::Entry;
use super::{io_error, set_file_metadata};
use crate::Error;

/// Files up to this size are handed over; larger ones are written by the applier itself,
/// chunk by chunk, instead of being held in memory whole.
pub(super) const MAX_FILE: usize = 128 * 1024;

/// Buffer capacity handed over and not yet returned, per layer: a bound on the memory a
/// layer takes, and far more than the worker needs to stay busy.
const BUDGET: usize = 256 * 1024;

/// Files go over in batches of up to this many files or bytes, so that the two threads
/// wake each other once per batch rather than once per file.
const BATCH_FILES: usize = 32;
const BATCH_BYTES: usize = 64 * 1024;

/// Returned buffers kept for reuse, by total capacity.
const SPARE_BYTES: usize = 128 * 1024;

/// Batches sent and not yet taken by the worker.
pub(super) const QUEUE: usize = 8;

/// One file to finish: its descriptor, its whole content and its header.
pub(super) struct Job {
    pub(super) file: File,
    pub(super) data: Vec<u8>,
    pub(super) entry: Entry,
}

/// The worker's answer to one batch: the content buffers, and the first failure.
pub(super) struct Done {
    buffers: Vec<Vec<u8>>,
    failure: Option<Error>,
}

/// The applier's side: the batch being filled, what is in flight, reusable buffers and
/// the first failure.
pub(super) struct Handoff {
    batches: SyncSender<Vec<Job>>,
    done: Receiver<Done>,
    batch: Vec<Job>,
    batch_bytes: usize,
    /// Batches sent and not answered.
    pending: usize,
    /// Capacity of the buffers in the batch and in sent batches.
    in_flight: usize,
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
    failure: Option<Error>,
}

impl Handoff {
    pub(super) fn new(batches: SyncSender<Vec<Job>>, done: Receiver<Done>) -> Self {
        Handoff {
            batches,
            done,
            batch: Vec::with_capacity(BATCH_FILES),
            batch_bytes: 0,
            pending: 0,
            in_flight: 0,
            spare: Vec::new(),
            spare_bytes: 0,
            failure: None,
        }
    }

    /// A zeroed buffer of `size` bytes (at most [`MAX_FILE`]) for a file's content.
    pub(super) fn buffer(&mut self, size: usize) -> Vec<u8> {
        let mut buffer = match self.spare.pop() {
            Some(buffer) => {
                self.spare_bytes -= buffer.capacity();
                buffer
            }
            None => Vec::new(),
        };
        buffer.clear();
        buffer.reserve_exact(size);
        buffer.resize(size, 0);
        buffer
    }

    /// Queues `job`, waiting for earlier batches while the buffers in flight exceed the
    /// budget. Failures come out of [`check`](Self::check).
    pub(super) fn send(&mut self, job: Job) {
        self.in_flight += job.data.capacity();
        self.batch_bytes += job.data.len();
        self.batch.push(job);
        if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
            self.flush();
        }
        while self.in_flight > BUDGET {
            self.flush();
            if self.pending == 0 {
                break;
            }
            self.receive_one();
        }
    }

    /// Waits until every queued file is finished or has failed.
    pub(super) fn wait(&mut self) {
        self.flush();
        while self.pending > 0 {
            self.receive_one();
        }
    }

    /// The first failure of the worker so far, if any.
    pub(super) fn check(&mut self) -> Result<(), Error> {
        while let Ok(done) = self.done.try_recv() {
            self.record(done);
        }
        self.failure.take().map_or(Ok(()), Err)
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_FILES));
        self.batch_bytes = 0;
        self.pending += 1;
        self.batches
            .send(batch)
            .expect("the file worker runs as long as the applier");
    }

    fn receive_one(&mut self) {
        match self.done.recv() {
            Ok(done) => self.record(done),
            // The worker only stops when the queue closes, so every batch has been answered.
            Err(_) => self.pending = 0,
        }
    }

    fn record(&mut self, done: Done) {
        self.pending -= 1;
        for buffer in done.buffers {
            self.in_flight -= buffer.capacity();
            if self.spare_bytes + buffer.capacity() <= SPARE_BYTES {
                self.spare_bytes += buffer.capacity();
                self.spare.push(buffer);
            }
        }
        if let Some(failure) = done.failure {
            self.failure.get_or_insert(failure);
        }
    }
}

/// The worker: finishes batches in order until the applier closes the queue.
pub(super) fn work(batches: Receiver<Vec<Job>>, done: Sender<Done>) {
    for batch in batches {
        let mut answer = Done {
            buffers: Vec::with_capacity(batch.len()),
            failure: None,
        };
        for job in batch {
            let (data, finished) = finish(job);
            answer.buffers.push(data);
            if let Err(failure) = finished {
                answer.failure.get_or_insert(failure);
            }
        }
        if done.send(answer).is_err() {
            return;
        }
    }
}

fn finish(job: Job) -> (Vec<u8>, Result<(), Error>) {
    let Job {
        mut file,
        data,
        entry,
    } = job;
    let finished = file
        .write_all(&data)
        .map_err(io_error("write file"))
        .and_then(|()| set_file_metadata(&file, &entry))
        .map_err(|reason| Error::Layer {
            path: String::from_utf8_lossy(&entry.path).into_owned(),
            reason,
        });
    (data, finished)
}
