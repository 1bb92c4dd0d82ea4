"""Snapshots: the state file format (:mod:`.format`), the KVM state of the VM and its
vCPUs (:mod:`.kvmstate`) and the memory file (:mod:`.memfile`).  docs/snapshots.md."""
