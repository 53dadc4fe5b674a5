"""The ssh provider (to come, issue 10): the architecture on existing Debian hosts reached over SSH.

Its foundation is here: `transport` (SshPool, SshHost, SshTarget), the Host transport over one
asyncssh connection per host."""
