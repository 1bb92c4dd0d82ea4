"""The kvm-tier test guest: sources, build (build.py), output parser, QEMU runner.

See docs/testguest.md.
"""
