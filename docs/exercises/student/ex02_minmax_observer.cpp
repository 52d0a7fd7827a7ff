// Exercise 02: your MinMaxObserver::observe and ::qparams (quant/observer.h; docs/exercises/02-minmax-observer.md).
#include "core/error.h"
#include "quant/observer.h"

namespace lowbit::quant {

// Widens the running [min_, max_] to cover every value of x and sets observed_. An empty x changes
// nothing; a NaN makes min_ and max_ NaN for good.
void MinMaxObserver::observe(const Tensor& x) {
  // Your code here (then delete the throw).
  throw Error("exercise 02: MinMaxObserver::observe is not implemented yet");
}

// One QParams for the whole tensor, from the running range (eq. 4). Throws before any data was seen.
std::vector<QParams> MinMaxObserver::qparams() const {
  // Your code here (then delete the throw).
  throw Error("exercise 02: MinMaxObserver::qparams is not implemented yet");
}

}  // namespace lowbit::quant
