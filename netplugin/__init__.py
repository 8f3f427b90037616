"""netplugin: a libnetwork remote network driver and remote IPAM driver."""
