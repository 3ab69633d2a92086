"""The hospital side: Flower ClientApp, DP trainer, privacy ledger and `fedshift site`."""
