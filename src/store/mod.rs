//! The meta store: the one source of truth for cluster and db states, the
//! cluster locks and the task records.
//!
//! It sits behind [`MetaStore`] so that an etcd-backed store
//! ([`crate::store::etcd::EtcdStore`]) can replace the embedded file store. The file store never half-writes: every save writes a
//! temporary file, fsyncs it, renames it over `meta.json` and fsyncs the
//! directory, so a crash at any moment leaves the old or the new document.
//! Saves are compare-and-swap on the document's version, so two writers (the
//! server and `clupadm init --force`, say) can never silently overwrite each
//! other. A document that does not parse is reported, never guessed at.

pub mod etcd;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::config::{Config, StoreKind};
use crate::model::home::Home;
use crate::model::meta::{validate_cluster, Cluster, Clusters};

/// A background operation (failover, switch, repair) and its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub name: String,
    pub cluster: String,
    /// `running`, `success`, `failed` or `interrupted`.
    pub state: String,
    /// Epoch seconds.
    pub begin: u64,
    #[serde(default)]
    pub end: u64,
}

/// Everything the store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaDoc {
    /// Bumped by every save; 0 means "no document yet".
    pub version: u64,
    pub clusters: Clusters,
    #[serde(default)]
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub next_task_id: u64,
}

/// How many finished task records are kept.
pub const KEEP_TASKS: usize = 200;

impl MetaDoc {
    /// Check every cluster's invariants.
    pub fn validate(&self) -> Result<(), String> {
        for (name, c) in &self.clusters {
            validate_cluster(name, c).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Drop the oldest finished tasks beyond [`KEEP_TASKS`]; their ids (their
    /// logs go with them).
    pub fn trim_tasks(&mut self) -> Vec<u64> {
        let finished = self.tasks.iter().filter(|t| t.state != "running").count();
        let mut extra = finished.saturating_sub(KEEP_TASKS);
        let mut dropped = Vec::new();
        self.tasks.retain(|t| {
            if extra > 0 && t.state != "running" {
                extra -= 1;
                dropped.push(t.id);
                false
            } else {
                true
            }
        });
        dropped
    }
}

#[derive(Debug)]
pub enum StoreError {
    /// No document has been written yet (run `clupadm init`). Names where
    /// it was looked for (a file, an etcd key).
    Missing(String),
    /// The document exists but cannot be read as one; never guessed at.
    Corrupt(String, String),
    /// Someone else saved since this writer loaded.
    Conflict {
        expected: u64,
        found: u64,
    },
    /// The new document breaks an invariant; nothing was written.
    Invalid(String),
    Io(PathBuf, std::io::Error),
    /// A remote store (etcd) did not answer or refused; the message names
    /// the endpoint, and says so when a save may or may not have happened.
    Remote(String),
    /// A save fenced on the leader lease, by a monitor that no longer holds
    /// it; nothing was written.
    NotLeader(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Missing(p) => {
                write!(f, "no cluster meta at {p} (run 'clupadm init' first)")
            }
            StoreError::Corrupt(p, m) => write!(
                f,
                "cluster meta {p} is corrupt, refusing to act on it: {m}"
            ),
            StoreError::Conflict { expected, found } => write!(
                f,
                "cluster meta changed underneath (expected version {expected}, found {found}); retry"
            ),
            StoreError::Invalid(m) => write!(f, "refused, the meta would be invalid: {m}"),
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Remote(m) => f.write_str(m),
            StoreError::NotLeader(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StoreError {}

/// Where the meta lives. Implementations must make `save` atomic and durable.
pub trait MetaStore: Send + Sync {
    /// The current document.
    fn load(&self) -> Result<MetaDoc, StoreError>;
    /// One cluster of the current document (each probe thread asks every
    /// round: stores may answer without parsing the whole document).
    fn load_cluster(&self, name: &str) -> Result<Option<Cluster>, StoreError> {
        Ok(self.load()?.clusters.remove(name))
    }
    /// Replace the document if its version is still `doc.version`; the saved
    /// document gets `doc.version + 1`, which is returned.
    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError>;
    /// Whether any document exists.
    fn exists(&self) -> Result<bool, StoreError>;
    /// A short description for logs ("file /opt/clup/data/meta.json").
    fn describe(&self) -> String;
    /// Move a corrupt document out of the way, never deleting it, so that a
    /// new one can be saved (`clupadm init --force`); returns where it went.
    fn set_aside_corrupt(&self) -> Result<String, StoreError> {
        Err(StoreError::Invalid(format!(
            "{} cannot set a corrupt meta aside",
            self.describe()
        )))
    }
}

/// The store clup.conf names: `data/meta.json` under the home, or etcd.
pub fn open_store(cfg: &Config, home: &Home) -> Result<Arc<dyn MetaStore>, String> {
    Ok(match cfg.meta_store {
        StoreKind::File => Arc::new(FileStore::new(&home.data_dir())),
        StoreKind::Etcd => {
            let client = etcd::Client::new(&cfg.etcd_endpoints, cfg.etcd_timeout)?;
            Arc::new(etcd::EtcdStore::new(Arc::new(client), &cfg.etcd_prefix))
        }
    })
}

/// The embedded store: one JSON file under `data/`.
pub struct FileStore {
    dir: PathBuf,
    path: PathBuf,
    /// Serializes saves within this process; `flock` serializes processes.
    local: Mutex<()>,
    /// The document last parsed, with the file's identity then: reused
    /// while the file is the same (saves replace it by rename).
    cache: Mutex<Option<(FileStamp, Arc<MetaDoc>)>>,
    /// How many times the file was parsed (to see the cache work).
    parses: AtomicU64,
}

/// What tells one version of meta.json from another without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

impl FileStore {
    pub fn new(data_dir: &Path) -> FileStore {
        FileStore {
            dir: data_dir.to_path_buf(),
            path: data_dir.join("meta.json"),
            local: Mutex::new(()),
            cache: Mutex::new(None),
            parses: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn io(&self, p: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
        let p = p.to_path_buf();
        move |e| StoreError::Io(p.clone(), e)
    }

    /// The current document, parsed again only when the file changed.
    /// Parsing holds the cache, so that threads which find it stale wait
    /// for one parse instead of each making its own.
    fn read_cached(&self) -> Result<Option<Arc<MetaDoc>>, StoreError> {
        let stamp = match fs::metadata(&self.path) {
            Ok(m) => FileStamp::of(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io(self.path.clone(), e)),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, doc)) = cache.as_ref() {
            if *s == stamp {
                return Ok(Some(doc.clone()));
            }
        }
        match self.read_stamped()? {
            Some((read, doc)) => {
                let doc = Arc::new(doc);
                *cache = read.map(|s| (s, doc.clone()));
                Ok(Some(doc))
            }
            None => {
                *cache = None;
                Ok(None)
            }
        }
    }

    fn read(&self) -> Result<Option<MetaDoc>, StoreError> {
        Ok(self.read_stamped()?.map(|(_, doc)| doc))
    }

    /// The document, with the stamp of the very file it was read from
    /// (None if that file changed while it was read: edited in place).
    /// A save that replaces the file meanwhile does not matter: what was
    /// opened is still the old file, whole.
    fn read_stamped(&self) -> Result<Option<(Option<FileStamp>, MetaDoc)>, StoreError> {
        let io = |e| StoreError::Io(self.path.clone(), e);
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let before = FileStamp::of(&f.metadata().map_err(io)?);
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(io)?;
        let after = FileStamp::of(&f.metadata().map_err(io)?);
        self.parses.fetch_add(1, Ordering::Relaxed);
        let doc: MetaDoc = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(self.shown(), e.to_string()))?;
        if doc.version == 0 {
            return Err(StoreError::Corrupt(
                self.shown(),
                "version 0 in a saved document".to_string(),
            ));
        }
        // Saves validate, but the file may have been edited by hand: a
        // value that would reach a shell unchecked is refused here too.
        doc.validate()
            .map_err(|m| StoreError::Corrupt(self.shown(), m))?;
        Ok(Some(((before == after).then_some(before), doc)))
    }
}

/// An exclusive `flock` held until dropped.
struct FileLock(File);

impl FileLock {
    fn acquire(path: &Path) -> std::io::Result<FileLock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Write `bytes` to `path` atomically and durably: temp file, fsync, rename,
/// fsync of the directory. Used for the meta and other small state files.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl MetaStore for FileStore {
    fn load(&self) -> Result<MetaDoc, StoreError> {
        self.read_cached()?
            .map(|d| (*d).clone())
            .ok_or_else(|| StoreError::Missing(self.path.display().to_string()))
    }

    fn load_cluster(&self, name: &str) -> Result<Option<Cluster>, StoreError> {
        let doc = self
            .read_cached()?
            .ok_or_else(|| StoreError::Missing(self.path.display().to_string()))?;
        Ok(doc.clusters.get(name).cloned())
    }

    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError> {
        doc.validate().map_err(StoreError::Invalid)?;
        let _local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let lock_path = self.dir.join("meta.lock");
        let _lock = FileLock::acquire(&lock_path).map_err(self.io(&lock_path))?;
        // Under the lock no other writer is mid-save: any temp file left
        // here belongs to a writer that died, and is swept.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(".meta.json.tmp.")
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // Under the lock the file cannot change: the cached document, if
        // it is still the file's, tells the version without a parse.
        let found = self.read_cached()?.map_or(0, |d| d.version);
        if found != doc.version {
            return Err(StoreError::Conflict {
                expected: doc.version,
                found,
            });
        }
        let mut next = doc.clone();
        next.version = doc.version + 1;
        let mut bytes = serde_json::to_vec_pretty(&next).expect("meta serializes");
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(self.io(&self.path))?;
        // What was just written is what the next load would parse.
        let version = next.version;
        if let Ok(m) = fs::metadata(&self.path) {
            *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((FileStamp::of(&m), Arc::new(next)));
        }
        Ok(version)
    }

    fn exists(&self) -> Result<bool, StoreError> {
        Ok(self.read()?.is_some())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn set_aside_corrupt(&self) -> Result<String, StoreError> {
        let aside = self
            .path
            .with_extension(format!("corrupt.{}", crate::now_secs()));
        fs::rename(&self.path, &aside).map_err(self.io(&self.path))?;
        Ok(aside.display().to_string())
    }
}

/// Load, change, save, retrying on version conflicts: the one way to update.
/// `change` may refuse by returning `Err(msg)`; then nothing is written.
pub fn update<T>(
    store: &dyn MetaStore,
    mut change: impl FnMut(&mut MetaDoc) -> Result<T, String>,
) -> Result<(T, MetaDoc), UpdateError> {
    for _ in 0..10 {
        let mut doc = store.load().map_err(UpdateError::Store)?;
        let out = change(&mut doc).map_err(UpdateError::Refused)?;
        match store.save(&doc) {
            Ok(v) => {
                doc.version = v;
                return Ok((out, doc));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(UpdateError::Store(e)),
        }
    }
    Err(UpdateError::Refused(
        "cluster meta kept changing underneath; gave up after 10 tries".to_string(),
    ))
}

#[derive(Debug)]
pub enum UpdateError {
    Refused(String),
    Store(StoreError),
}

impl fmt::Display for UpdateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::Refused(m) => f.write_str(m),
            UpdateError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpdateError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    pub(crate) fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "clup-store-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn doc() -> MetaDoc {
        MetaDoc {
            version: 0,
            clusters: parse_clusters(SAMPLE_INIT).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn missing_then_saved_then_loaded() {
        let dir = tempdir("basic");
        let s = FileStore::new(&dir);
        assert!(matches!(s.load(), Err(StoreError::Missing(_))));
        assert!(!s.exists().unwrap());
        assert_eq!(s.save(&doc()).unwrap(), 1);
        let got = s.load().unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(got.clusters, doc().clusters);
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn cached_loads_follow_every_change_of_the_file() {
        let dir = tempdir("cache");
        let a = FileStore::new(&dir);
        let b = FileStore::new(&dir); // another process, as far as a knows
        a.save(&doc()).unwrap();
        let c = a.load_cluster("cluster01").unwrap().unwrap();
        assert_eq!(c, doc().clusters["cluster01"]);
        assert_eq!(a.load_cluster("nope").unwrap(), None);
        // Saved elsewhere (rename: a new file).
        update(&b, |d| {
            d.clusters.get_mut("cluster01").unwrap().read_vip = "10.9.9.9".into();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            a.load_cluster("cluster01").unwrap().unwrap().read_vip,
            "10.9.9.9"
        );
        assert_eq!(a.load().unwrap().version, 2);
        // Edited in place by hand (same file, new length).
        let text = fs::read_to_string(dir.join("meta.json")).unwrap();
        fs::write(dir.join("meta.json"), text.replace("10.9.9.9", "10.9.9.10")).unwrap();
        assert_eq!(
            a.load_cluster("cluster01").unwrap().unwrap().read_vip,
            "10.9.9.10"
        );
        // Gone.
        fs::remove_file(dir.join("meta.json")).unwrap();
        assert!(matches!(
            a.load_cluster("cluster01"),
            Err(StoreError::Missing(_))
        ));
        assert!(matches!(a.load(), Err(StoreError::Missing(_))));
    }

    #[test]
    fn a_save_needs_no_parse_and_seeds_the_cache() {
        let dir = tempdir("seed");
        let a = FileStore::new(&dir);
        let b = FileStore::new(&dir);
        a.save(&doc()).unwrap();
        assert_eq!(a.parses.load(Ordering::Relaxed), 0);
        for i in 0..5 {
            update(&a, |d| {
                d.clusters.get_mut("cluster01").unwrap().read_vip = format!("10.9.9.{i}");
                Ok(())
            })
            .unwrap();
            assert_eq!(
                a.load_cluster("cluster01").unwrap().unwrap().read_vip,
                format!("10.9.9.{i}")
            );
        }
        assert_eq!(a.parses.load(Ordering::Relaxed), 0, "only its own saves");
        // Another writer: a's next load and next save parse once, then
        // its own saves need none again.
        update(&b, |d| {
            d.clusters.get_mut("cluster01").unwrap().read_vip = "10.8.8.8".into();
            Ok(())
        })
        .unwrap();
        let v = a.load().unwrap().version;
        assert_eq!(v, 7);
        update(&a, |d| {
            d.clusters.get_mut("cluster01").unwrap().read_vip = "10.7.7.7".into();
            Ok(())
        })
        .unwrap();
        assert_eq!(a.load().unwrap().version, 8);
        assert_eq!(a.parses.load(Ordering::Relaxed), 1);
        // A stale save is still refused (b's cache is old).
        update(&a, |_| Ok(())).unwrap();
        assert!(matches!(b.save(&b.load().unwrap()), Ok(10)));
        let mut stale = a.load().unwrap();
        stale.version -= 1;
        assert!(matches!(a.save(&stale), Err(StoreError::Conflict { .. })));
    }

    #[test]
    fn stale_version_is_a_conflict() {
        let s = FileStore::new(&tempdir("conflict"));
        s.save(&doc()).unwrap();
        let stale = doc(); // version 0, store is at 1
        match s.save(&stale) {
            Err(StoreError::Conflict {
                expected: 0,
                found: 1,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_doc_is_not_written() {
        let s = FileStore::new(&tempdir("invalid"));
        let mut d = doc();
        d.clusters.get_mut("cluster01").unwrap().db_list[1].is_primary = 1;
        let e = s.save(&d).unwrap_err();
        assert!(e.to_string().contains("exactly one database"), "{e}");
        assert!(!s.exists().unwrap());
    }

    #[test]
    fn corrupt_file_is_reported_not_guessed() {
        let dir = tempdir("corrupt");
        let s = FileStore::new(&dir);
        s.save(&doc()).unwrap();
        fs::write(dir.join("meta.json"), "{\"version\": 3, \"clus").unwrap();
        let e = s.load().unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(..)), "{e:?}");
        assert!(e.to_string().contains("corrupt, refusing to act"), "{e}");
        // And an update refuses too, leaving the file as it was.
        assert!(update(&s, |_| Ok(())).is_err());
        assert_eq!(
            fs::read_to_string(dir.join("meta.json")).unwrap(),
            "{\"version\": 3, \"clus"
        );
    }

    #[test]
    fn update_applies_and_refusal_writes_nothing() {
        let s = FileStore::new(&tempdir("update"));
        s.save(&doc()).unwrap();
        let (_, d) = update(&s, |d| {
            d.clusters.get_mut("cluster01").unwrap().db_list[3].state = 2;
            Ok(())
        })
        .unwrap();
        assert_eq!(d.version, 2);
        assert_eq!(s.load().unwrap().clusters["cluster01"].db_list[3].state, 2);
        let e = update(&s, |_| Err::<(), _>("no".to_string())).unwrap_err();
        assert_eq!(e.to_string(), "no");
        assert_eq!(s.load().unwrap().version, 2);
    }

    #[test]
    fn trim_keeps_running_tasks() {
        let mut d = doc();
        for id in 0..(KEEP_TASKS as u64 + 5) {
            d.tasks.push(Task {
                id,
                name: "t".into(),
                cluster: "c".into(),
                state: if id == 0 { "running" } else { "success" }.into(),
                begin: 0,
                end: 0,
            });
        }
        assert_eq!(d.trim_tasks(), [1, 2, 3, 4]);
        assert_eq!(d.tasks.len(), KEEP_TASKS + 1);
        assert_eq!(d.tasks[0].id, 0);
        assert_eq!(d.tasks[1].id, 5);
    }
}
