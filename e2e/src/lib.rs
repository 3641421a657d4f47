//! End-to-end harness: a real etcd + kube-apiserver (+ controller-manager) on loopback for cluster tests.
