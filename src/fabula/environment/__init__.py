"""What every command that reads or changes an environment shares: opening it (the provider
chosen by `provider:`), its lock, its history, the operation record, and its firewalls."""
