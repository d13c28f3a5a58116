"""What cloud VMs are bootstrapped with: templates and policies, shipped as package data."""
