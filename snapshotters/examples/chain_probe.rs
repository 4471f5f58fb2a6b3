use snapshotters::{Backend, Snapshots, Snapshotter, UNPACK_LABEL};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let backend: Backend = std::env::args().nth(2).unwrap().parse().unwrap();
    let tars: Vec<String> = std::env::args().skip(3).collect();
    let work = tempfile::tempdir_in(&dir).unwrap();
    let db = redb::Database::create(work.path().join("meta.redb")).unwrap();
    let sn = Snapshots::open(backend, work.path().join("sn"), Arc::new(db)).unwrap();
    let mut parent: Option<String> = None;
    let start = Instant::now();
    for (i, tar) in tars.iter().enumerate() {
        let key = format!("extract {i}");
        let labels = BTreeMap::from([(UNPACK_LABEL.to_owned(), i.to_string())]);
        let t0 = Instant::now();
        sn.prepare(&key, parent.as_deref(), labels.clone()).unwrap();
        let t1 = Instant::now();
        let mut r = BufReader::with_capacity(1 << 20, File::open(tar).unwrap());
        sn.apply(&key, &mut r).unwrap();
        let t2 = Instant::now();
        let name = format!("layer{i}");
        sn.commit(&name, &key, None, labels).unwrap();
        let t3 = Instant::now();
        println!(
            "{i}: prepare {:?} apply {:?} commit {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2
        );
        parent = Some(name);
    }
    println!("total {:?}", start.elapsed());
}
