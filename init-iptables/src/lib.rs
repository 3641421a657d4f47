//! remora-init: installs the iptables rules that send a pod's TCP traffic through the sidecar.
