//! One policy per target: when several resources of a kind claim the same target, the
//! oldest (by `creationTimestamp`, then by name) is in effect and the others are
//! `Conflicted`. Pure: the candidates are passed in.

use kube::ResourceExt;

/// The order in which claims are honoured: older first, then by name; objects without a
/// creation timestamp (not yet persisted) sort last.
fn seniority<K: ResourceExt>(obj: &K) -> (bool, Option<k8s_openapi::jiff::Timestamp>, String) {
    let ts = obj.meta().creation_timestamp.as_ref().map(|t| t.0);
    (ts.is_none(), ts, obj.name_any())
}

/// The oldest of `candidates` (by `creationTimestamp`, then name): the one in effect.
pub fn oldest<'a, K: ResourceExt + 'a>(
    candidates: impl IntoIterator<Item = &'a K>,
) -> Option<&'a K> {
    candidates.into_iter().min_by_key(|c| seniority(*c))
}

/// Among `candidates` (every object of the kind in the namespace), those for which
/// `same_target` holds compete with `obj`; returns the name of the winner when it is not
/// `obj` itself. `obj` need not be among `candidates` (its newest copy is used).
pub fn winner_over<'a, K: ResourceExt>(
    obj: &'a K,
    candidates: impl IntoIterator<Item = &'a K>,
    same_target: impl Fn(&K) -> bool,
) -> Option<String> {
    let own = seniority(obj);
    candidates
        .into_iter()
        .filter(|c| c.name_any() != obj.name_any() && same_target(c))
        .map(seniority)
        .filter(|other| *other < own)
        .min()
        .map(|(_, _, name)| name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::Time};

    pub(crate) fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).expect("timestamp"))
    }

    fn cm(name: &str, created: Option<i64>, target: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.to_owned());
        c.metadata.creation_timestamp = created.map(at);
        c.data = Some([("target".to_owned(), target.to_owned())].into());
        c
    }

    fn target(c: &ConfigMap) -> &str {
        c.data
            .as_ref()
            .and_then(|d| d.get("target"))
            .map_or("", String::as_str)
    }

    fn winner(obj: &ConfigMap, all: &[ConfigMap]) -> Option<String> {
        winner_over(obj, all, |c| target(c) == target(obj))
    }

    #[test]
    fn oldest_wins_then_name() {
        let all = vec![
            cm("b", Some(10), "x"),
            cm("a", Some(20), "x"),
            cm("c", Some(10), "x"),
            cm("z", Some(1), "y"),
        ];
        assert_eq!(winner(&all[0], &all), None);
        assert_eq!(winner(&all[1], &all), Some("b".to_owned()));
        assert_eq!(
            winner(&all[2], &all),
            Some("b".to_owned()),
            "same age: name decides"
        );
        assert_eq!(winner(&all[3], &all), None, "other target does not compete");
        let x: Vec<&ConfigMap> = all.iter().filter(|c| target(c) == "x").collect();
        assert_eq!(oldest(x).map(|c| c.name_any()), Some("b".to_owned()));
    }

    #[test]
    fn unpersisted_objects_lose_and_the_object_itself_never_competes() {
        let all = vec![cm("new", None, "x"), cm("old", Some(5), "x")];
        assert_eq!(winner(&all[0], &all), Some("old".to_owned()));
        assert_eq!(winner(&all[1], &all), None);
        // a stale copy of the object in the candidates does not beat it
        let stale = cm("old", Some(1), "x");
        assert_eq!(winner(&all[1], &[stale]), None);
    }
}
