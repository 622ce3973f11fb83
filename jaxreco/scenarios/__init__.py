"""Shopping-guide scenarios beside personal picks: complete the cart (:mod:`.basket`)."""
