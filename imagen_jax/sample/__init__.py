"""Cascade sampling from stage workdirs."""
