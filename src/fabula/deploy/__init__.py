"""Releases (launch configurations), deploys (serial and full) and the web group they act on."""
