"""What the server and the clients share: model surgery, records, data, privacy maths."""
