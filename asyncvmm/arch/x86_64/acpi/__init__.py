"""ACPI tables for an asyncvmm x86-64 guest; :mod:`.aml` and :mod:`.resources` encode the DSDT's AML."""
