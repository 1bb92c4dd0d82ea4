"""The vhost-user protocol, front-end side: encoding (:mod:`.protocol`) and the socket (:mod:`.frontend`)."""
