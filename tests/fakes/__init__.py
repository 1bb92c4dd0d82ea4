"""Test doubles shared by the unit tier (no KVM, no real devices)."""
