"""The hospital side: Flower ClientApp, DP trainer and the site's privacy ledger."""
